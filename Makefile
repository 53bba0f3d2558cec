# The two set-up commands of the README live here, so a new user and CI run the same thing.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
DEB_PACKAGES := mosquitto swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config tmux iproute2 postgresql nats-server

.PHONY: up install test test-deps system-deps protos promtool lint

# The gRPC runtime first, at its newest: the editable install generates the gRPC modules with the
# newest grpcio-tools (build isolation), and generated code refuses an older grpcio runtime.
GRPC_RUNTIME = grpcio grpcio-health-checking grpcio-reflection

install:
	$(PIP) install -q -U $(GRPC_RUNTIME)
	$(PIP) install -q -e .

protos:
	$(PYTHON) -c "from setup import generate_protos; generate_protos()"

up: install
	$(PYTHON) -m edgeward up

system-deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then echo "system packages present"; \
	elif [ "$$(id -u)" = 0 ]; then echo "installing:$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	  || { echo "apt-get failed for:$$missing" >&2; exit 1; }; \
	else echo "NOTE: not root, cannot install:$$missing -- tests that need them will be skipped with a reason"; fi

# promtool (for the /metrics format test) from Debian's prometheus package, unpacked into .cache
# rather than installed: the package would also install and start a Prometheus server.
PROMTOOL_DIR := .cache/prometheus
promtool:
	@if command -v promtool >/dev/null 2>&1 || [ -x $(PROMTOOL_DIR)/usr/bin/promtool ]; then echo "promtool present"; \
	else mkdir -p $(PROMTOOL_DIR) && cd $(PROMTOOL_DIR) && \
	  { apt-get download prometheus >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get download prometheus >/dev/null 2>&1; }; } && \
	  dpkg-deb -x prometheus_*.deb . && rm -f prometheus_*.deb && echo "promtool unpacked into $(PROMTOOL_DIR)" \
	  || echo "NOTE: Debian's prometheus package could not be fetched: the promtool test will be skipped"; fi

test-deps: system-deps promtool
	$(PIP) install -q -U $(GRPC_RUNTIME)
	$(PIP) install -q -e '.[dev,tpm,postgres,nats]'

test: test-deps
	$(PYTHON) -m pytest

# Lint, format check and type check (docs/development.md); .ci/run runs it before the tests.
lint: test-deps
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy
