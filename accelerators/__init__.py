"""Accelerator backends: one per kind behind one small interface (``accelerators.base``).

Backends are created by kind through ``accelerators.registry``; ``accelerators.tflite_model``
inspects model files. The contract's types are re-exported here.
"""

from accelerators.base import (
    AcceleratorError,
    Backend,
    BackendUnavailable,
    Capabilities,
    InferenceFailed,
    InferResult,
    InvalidConfig,
    InvalidInput,
    InvalidModel,
    ModelArtifact,
    ModelHandle,
    ModelInfo,
    ModelNotLoaded,
    ModelRefused,
    PowerModel,
    Profile,
    Quantization,
    TensorSpec,
)

__all__ = [
    "AcceleratorError",
    "Backend",
    "BackendUnavailable",
    "Capabilities",
    "InferResult",
    "InferenceFailed",
    "InvalidConfig",
    "InvalidInput",
    "InvalidModel",
    "ModelArtifact",
    "ModelHandle",
    "ModelInfo",
    "ModelNotLoaded",
    "ModelRefused",
    "PowerModel",
    "Profile",
    "Quantization",
    "TensorSpec",
]
