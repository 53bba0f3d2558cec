"""The standard gRPC services every edgeward server offers beside its own: health and reflection.

* Health: grpcio-health-checking's asyncio servicer advertises ``List`` (health.proto has it) but
  leaves it unimplemented, so a client calling it got UNIMPLEMENTED and the server logged a
  traceback. :class:`HealthServicer` answers it with every service's status.
* Reflection: grpcio-reflection ships ``grpc.reflection.v1alpha`` only, while current clients
  (grpcurl, grpcui, Postman) ask for ``grpc.reflection.v1`` first. The two protocols are the same
  messages with the same field numbers under another package, so :func:`enable_reflection` serves
  v1 with the v1alpha implementation and messages, beside v1alpha itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION_V1ALPHA = reflection.SERVICE_NAME
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
#: Full method names of the standard services, for authorization tables.
STANDARD_METHODS = (
    f"/{HEALTH_SERVICE}/Check",
    f"/{HEALTH_SERVICE}/Watch",
    f"/{HEALTH_SERVICE}/List",
    f"/{REFLECTION_V1ALPHA}/ServerReflectionInfo",
    f"/{REFLECTION_V1}/ServerReflectionInfo",
)


class HealthServicer(health.aio.HealthServicer):
    """The asyncio health servicer, with ``List`` answered."""

    def __init__(self) -> None:
        super().__init__()
        self._statuses: dict[str, int] = {"": health_pb2.HealthCheckResponse.SERVING}

    async def set(self, service: str, status: int) -> None:
        await super().set(service, status)
        self._statuses[service] = status

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        for service in self._statuses:
            self._statuses[service] = health_pb2.HealthCheckResponse.NOT_SERVING

    async def List(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        # The health stubs (types-grpcio-health-checking) predate List and its messages.
        return health_pb2.HealthListResponse(  # type: ignore[attr-defined]
            statuses={name: health_pb2.HealthCheckResponse(status=s) for name, s in self._statuses.items()}
        )


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection v1alpha and v1 for ``service_names`` (plus health and reflection)."""
    names = (*service_names, HEALTH_SERVICE, REFLECTION_V1ALPHA, REFLECTION_V1)
    # The asyncio implementation (what grpc_reflection's own enable_server_reflection picks for an
    # aio server), registered under both package names.
    servicer = ReflectionServicer(names)
    for service in (REFLECTION_V1ALPHA, REFLECTION_V1):
        handler = grpc.method_handlers_generic_handler(
            service,
            {
                "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                    servicer.ServerReflectionInfo,
                    request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                    response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
                )
            },
        )
        server.add_generic_rpc_handlers((handler,))
