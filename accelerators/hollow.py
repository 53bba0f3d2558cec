"""sim-hollow: the backend of hollow nodes (``edgeward sim-fleet``), simulated and labelled so.

A hollow node (after kubemark's hollow kubelet) runs the real node agent, with its real MQTT
session, attestation and command handling, on a backend that does no inference work: thousands of
them share one process to load-test the control plane. ``load`` checks what a real backend checks
before it runs anything (the model's digest and that it is a TFLite model, inspected once per
process and model: the hollow nodes of a process share that cache), then holds no interpreter;
``infer`` answers zeros of the model's output signature after a modelled latency, without
sleeping. Energy is modelled. The device name and ``simulated=True`` say so wherever it shows.
"""

from __future__ import annotations

import threading
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from accelerators.base import (
    NUMPY_DTYPES,
    Backend,
    Capabilities,
    InferResult,
    Inputs,
    ModelArtifact,
    ModelHandle,
    ModelInfo,
    ModelNotLoaded,
    PowerModel,
    Profile,
)
from accelerators.cpu_litert import PowerConfig
from accelerators.tflite_model import inspect_tflite

__all__ = ["KIND", "HollowBackend", "HollowConfig"]

KIND = "sim-hollow"
_ALL_DTYPES = frozenset(NUMPY_DTYPES)
# Model signatures by sha256, shared by every hollow node of the process (bounded).
_INSPECTED: dict[str, ModelInfo] = {}
_INSPECTED_MAX = 256
_INSPECT_LOCK = threading.Lock()


class HollowConfig(BaseModel):
    """Configuration of a hollow node's backend."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    power: PowerConfig = Field(
        default_factory=PowerConfig, description="Board power model (modelled energy)."
    )
    latency_ms: float = Field(
        default=1.0, gt=0, le=60_000, title="Modelled latency (ms)", description="Reported per inference."
    )
    memory_bytes: int = Field(default=512 * 1024**2, ge=0, description="Memory offered to models.")


class HollowBackend(Backend):
    """No inference work: signature checks and zeros, for control-plane scale tests."""

    kind: ClassVar[str] = KIND
    config_model: ClassVar[type[BaseModel]] = HollowConfig

    def __init__(self, config: HollowConfig | None = None) -> None:
        self.config = config or HollowConfig()
        power = PowerModel(self.config.power.idle_w, self.config.power.active_w)
        self._capabilities = Capabilities(
            kind=KIND,
            device="hollow node (simulated: no inference work)",
            simulated=True,
            dtypes=_ALL_DTYPES,
            ops=None,
            memory_bytes=self.config.memory_bytes,
            peak_gops=1.0,
            power=power,
        )
        self._loaded: set[int] = set()

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def load(self, model: ModelArtifact) -> ModelHandle:
        info = _INSPECTED.get(model.sha256)
        if info is None:
            info = inspect_tflite(model.read())  # InvalidModel, as on a real backend
            with _INSPECT_LOCK:
                while len(_INSPECTED) >= _INSPECTED_MAX:
                    _INSPECTED.pop(next(iter(_INSPECTED)))
                _INSPECTED[model.sha256] = info
        handle = ModelHandle(model.name, model.version, model.sha256, KIND, info.inputs, info.outputs)
        self._loaded.add(handle.id)
        return handle

    def infer(self, handle: ModelHandle, inputs: Inputs) -> InferResult:
        if handle.id not in self._loaded:
            raise ModelNotLoaded(handle.name, handle.version)
        outputs = {
            spec.name: np.zeros([max(d, 1) for d in spec.shape], spec.numpy_dtype) for spec in handle.outputs
        }
        latency_s = self.config.latency_ms / 1e3
        energy = self._capabilities.power.energy_j(latency_s, latency_s)
        return InferResult(outputs, latency_s, energy, "modelled")

    def unload(self, handle: ModelHandle) -> None:
        self._loaded.discard(handle.id)

    def close(self) -> None:
        self._loaded.clear()

    def profile(self, model: ModelArtifact, runs: int = 50, *, warmup: int = 3) -> Profile:
        """The modelled figures, without running anything ``runs`` times."""
        latency_s = self.config.latency_ms / 1e3
        return Profile(
            runs=runs,
            p50_ms=self.config.latency_ms,
            p95_ms=self.config.latency_ms,
            joules_per_inference=self._capabilities.power.energy_j(latency_s, latency_s),
            energy_source="modelled",
        )
