"""The model the fleet benchmarks deploy: the industrial int8 vibration CNN, pushed signed."""

from __future__ import annotations

import hashlib
from typing import Any

from edgeward.v1 import api_pb2
from usecases import model_path


async def push_vib_cnn(models: Any, publisher: Any) -> None:
    """Push ``vib-cnn`` 1.0.0 through ``models`` (a ModelService stub), signed by ``publisher``."""
    from orchestrator.catalog.signing import sign_metadata

    data = model_path("industrial", "int8").read_bytes()
    meta = api_pb2.ModelMetadata(
        name="vib-cnn", version="1.0.0", size=len(data), sha256=hashlib.sha256(data).hexdigest()
    )
    meta = sign_metadata(meta, publisher)

    async def parts():
        yield api_pb2.PushModelRequest(metadata=meta)
        yield api_pb2.PushModelRequest(chunk=data)

    await models.Push(parts())
