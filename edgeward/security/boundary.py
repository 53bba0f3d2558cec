"""The edge of a gRPC server: requests that do not decode, and checks that run before a handler.

grpcio answers a request its deserializer cannot read with UNKNOWN (and logs a traceback); a
request that is not the method's protobuf is the caller's mistake, so `RequestGuard` wraps every
deserializer: a ``DecodeError`` (corrupt wire format, a string field that is not UTF-8) becomes an
`Undecodable` value that the guard refuses with INVALID_ARGUMENT before the handler runs.
`edgeward.security.authz.AuthzInterceptor` extends it to identify, authorize and audit; servers
without authorization (plaintext demo, node inference) use `RequestGuard` itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

log = logging.getLogger(__name__)

UNDECODABLE = "request.undecodable"


class Undecodable:
    """Stands in for a request message that did not decode; ``error`` says why (no payload bytes)."""

    __slots__ = ("error", "size")

    def __init__(self, error: str, size: int) -> None:
        self.error = error
        self.size = size

    def __str__(self) -> str:
        return f"{UNDECODABLE}: not a valid request message ({self.size} bytes): {self.error:.200}"


class StreamCut(Exception):
    """A response stream was ended from outside (its caller's certificate was revoked)."""


async def until_set(event: asyncio.Event, items: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """``items`` until ``event`` is set, then `StreamCut` (the generator is closed first). The next
    item is awaited beside the event, so an idle stream (a Watch with nothing to say) ends too."""
    stop = asyncio.ensure_future(event.wait())
    source = aiter(items)
    step: asyncio.Future[Any] | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(source))
            await asyncio.wait((step, stop), return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                raise StreamCut
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        for pending in (step, stop):  # a step still running owns the generator: end it first
            if pending is not None and not pending.done():
                pending.cancel()
            if pending is not None:
                await asyncio.gather(pending, return_exceptions=True)
        closing = getattr(source, "aclose", None)
        if closing is not None:
            await closing()


def guarded(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as err:
            return Undecodable(str(err).splitlines()[0] if str(err) else type(err).__name__, len(data))

    return deserialize


# grpc.aio keeps the AbortError of an aborted call on its RPC state, whose traceback keeps the frames
# of the handler, and those frames keep the servicer context, which keeps the RPC state: a cycle
# through grpc's Cython objects that the garbage collector does not break, holding the request (a
# 3.8 MB manifest) of every refused call. The outermost wrapper of every handler hands grpc the very
# same AbortError (grpc checks that it is), without the traceback and the exceptions it chained, and
# drops its own references to the call first.


def _bare(err: BaseException) -> BaseException:
    err.__context__ = err.__cause__ = None
    return err.with_traceback(None)


def _released(call: Callable[..., Any]) -> Callable[..., Any]:
    async def released(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await call(request, context)
        except grpc.aio.AbortError as err:
            del request, context
            raise _bare(err) from None

    return released


def _released_stream(call: Callable[..., Any]) -> Callable[..., Any]:
    async def released(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in call(request, context):
                yield item
        except grpc.aio.AbortError as err:
            del request, context
            raise _bare(err) from None

    return released


class RequestGuard(grpc.aio.ServerInterceptor):
    """Refuses undecodable requests with INVALID_ARGUMENT; subclasses add their own admission."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        kwargs = {
            "request_deserializer": guarded(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _released(self.unary(method, handler.unary_unary)), **kwargs
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _released_stream(self.ustream(method, handler.unary_stream)), **kwargs
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _released(self.sunary(method, handler.stream_unary)), **kwargs
            )
        assert handler.stream_stream is not None  # a handler has exactly one of the four
        return grpc.stream_stream_rpc_method_handler(
            _released_stream(self.sstream(method, handler.stream_stream)), **kwargs
        )

    async def refuse(self, method: str, bad: Undecodable, context: grpc.aio.ServicerContext) -> None:
        """End the call with INVALID_ARGUMENT (raises)."""
        log.warning("refused %s from %s: %s", method, context.peer(), str(bad))
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(bad))

    def checked(
        self, method: str, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """A request stream that ends the call at its first undecodable message."""

        async def each() -> AsyncIterator[Any]:
            async for item in requests:
                if isinstance(item, Undecodable):
                    await self.refuse(method, item, context)
                yield item

        return each()

    async def admit(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        """Runs before the handler (``request`` is None for a request stream); aborts to refuse."""
        if isinstance(request, Undecodable):
            await self.refuse(method, request, context)

    def responses(
        self, method: str, items: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """The response stream a handler produces, as sent (subclasses may end it early)."""
        return items

    # ---- per call shape

    def unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self.admit(method, request, context)
            return await behavior(request, context)

        return call

    def ustream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await self.admit(method, request, context)
            async for item in self.responses(method, behavior(request, context), context):
                yield item

        return call

    def sunary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def call(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            await self.admit(method, None, context)
            return await behavior(self.checked(method, requests, context), context)

        return call

    def sstream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def call(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await self.admit(method, None, context)
            async for item in self.responses(
                method, behavior(self.checked(method, requests, context), context), context
            ):
                yield item

        return call
