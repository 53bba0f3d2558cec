"""``edgeward.v1.AttestationService`` over an :class:`AttestationVerifierService`.

The orchestrator adds it to its gRPC server::

    servicer = AttestationServicer(service, attest_now=send_challenge)   # async (node_id) -> None
    attestation_pb2_grpc.add_AttestationServiceServicer_to_server(servicer, server)

``attest_now`` is how AttestNow reaches the node: the orchestrator publishes
``service.challenge(node_id)`` on the node's command topic. AttestNow then waits (up to
``attest_timeout_s``) for the node's next state change and returns the node's state; a node
that did not answer in time comes back unchanged, its ``last_rejection`` telling why if it
answered badly. Watch streams every node's current state first, then every change; a watcher
that falls behind by more than ``depth`` changes loses the oldest ones.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Protocol

import grpc

from edgeward.v1 import attestation_pb2 as pb
from edgeward.v1 import attestation_pb2_grpc

AttestNow = Callable[[str], Awaitable[None]]


class AttestationSource(Protocol):
    """What the servicer reads: an :class:`~attestation.service.AttestationVerifierService`, or
    anything that answers for one (an orchestrator replica that does not lead answers from the
    leader's results as the store has them)."""

    def snapshot(self, node_id: str) -> pb.NodeAttestation | None: ...
    def snapshots(self) -> list[pb.NodeAttestation]: ...
    def subscribe(self, callback: Callable[[pb.NodeAttestation], None]) -> Callable[[], None]: ...


class AttestationServicer(attestation_pb2_grpc.AttestationServiceServicer):
    def __init__(
        self,
        service: AttestationSource,
        attest_now: AttestNow,
        *,
        attest_timeout_s: float = 10.0,
        depth: int = 1024,
        leading: Callable[[], bool] = lambda: True,
    ) -> None:
        """``leading``: whether this process challenges the nodes now (with several orchestrator
        replicas only the leader does; AttestNow elsewhere is refused, not left to time out)."""
        self._service = service
        self._attest_now = attest_now
        self._leading = leading
        self._timeout = attest_timeout_s
        self._depth = depth

    async def Get(
        self, request: pb.GetAttestationRequest, context: grpc.aio.ServicerContext
    ) -> pb.NodeAttestation:
        view = self._service.snapshot(request.node_id)
        if view is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"node {request.node_id!r} is not enrolled")
            raise AssertionError("abort raises")  # for type checkers
        return view

    async def List(
        self, request: pb.ListAttestationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAttestationsResponse:
        return pb.ListAttestationsResponse(nodes=self._service.snapshots())

    @contextlib.contextmanager
    def _changes(self) -> Iterator[asyncio.Queue[pb.NodeAttestation]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[pb.NodeAttestation] = asyncio.Queue(self._depth)

        def put(view: pb.NodeAttestation) -> None:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(view)

        def listener(view: pb.NodeAttestation) -> None:
            # The service calls listeners from whichever thread changed the state.
            loop.call_soon_threadsafe(put, view)

        unsubscribe = self._service.subscribe(listener)
        try:
            yield queue
        finally:
            unsubscribe()

    async def Watch(
        self, request: pb.WatchAttestationsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.NodeAttestation]:
        with self._changes() as queue:
            for view in self._service.snapshots():
                if not request.node_id or view.node_id == request.node_id:
                    yield view
            while True:
                view = await queue.get()
                if not request.node_id or view.node_id == request.node_id:
                    yield view

    async def AttestNow(
        self, request: pb.AttestNowRequest, context: grpc.aio.ServicerContext
    ) -> pb.NodeAttestation:
        node_id = request.node_id
        if not self._leading():
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "attestation.not_leader: this replica does not challenge the nodes; ask the leader "
                "(its edgeward_leader gauge is 1)",
            )
        if self._service.snapshot(node_id) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"node {node_id!r} is not enrolled")
        with self._changes() as queue:
            await self._attest_now(node_id)
            try:
                async with asyncio.timeout(self._timeout):
                    while True:
                        view = await queue.get()
                        if view.node_id == node_id:
                            return view
            except TimeoutError:
                pass
        final = self._service.snapshot(node_id)
        assert final is not None
        return final
