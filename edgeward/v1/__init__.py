"""Generated protobuf/gRPC modules for the edgeward.v1 API (built from the .proto files here).

The modules are produced by the package build (``pip install .`` or ``pip install -e .``); if
they are missing, reinstall the project.
"""
