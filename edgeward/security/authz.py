"""Authorization of the public gRPC API: roles from the peer certificate, a rule per method,
ownership of deployments and models, and the interceptor that enforces and audits it all.

Roles (docs/security.md):

- **operator**: every method.
- **team**: deployments and models it owns, nothing else. Creating a deployment (Apply) or a model
  (Push) records the team as its owner; a team may not touch what another team or the operator owns,
  List and Watch show only its own objects, and Apply may only reference a model the team owns.
- **node**: only ``ModelService/Download`` (sealed artifacts, useless without a key released to the
  attested node) and health checks. **orchestrator** and **broker** certificates: health checks only.

Unknown methods are refused for every role but the operator. A refused call ends with
``PERMISSION_DENIED`` (``UNAUTHENTICATED`` for a revoked or unreadable certificate) and a detail
``reason.id: explanation``; every refusal and every mutating call leaves one audit line.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from edgeward.grpc_standard import STANDARD_METHODS
from edgeward.security.audit import MAX_REASON, AuditEntry, AuditLog, bounded
from edgeward.security.boundary import UNDECODABLE, RequestGuard, StreamCut, Undecodable, until_set
from edgeward.security.errors import IdentityError
from edgeward.security.identity import Identity, Role
from edgeward.security.tls import RevocationList
from edgeward.v1 import api_pb2

log = logging.getLogger(__name__)

DEPLOYMENT = "deployment"
MODEL = "model"
PIPELINE = "pipeline"  # asked of `exists` only: whether deployments serve a multi-exit model of that name
OPERATOR_OWNER = "operator"
_ANY_ROLE = frozenset(Role)
_IDENTITY_CACHE = 1024
MAX_WATCHES = 16  # Watch streams one certificate may hold open at once
MAX_NAME = 253  # the longest name a request may give for its target (object names are shorter still)
FIRST_MESSAGE_S = 30.0  # a request stream (a model push) sends its first message within this, or ends


class Denied(Exception):
    """An authorization decision against the caller; ``reason`` is a machine-readable id."""

    def __init__(self, reason: str, detail: str, code: grpc.StatusCode = grpc.StatusCode.PERMISSION_DENIED):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.code = code


# ---------------------------------------------------------------- ownership


class Owners(Protocol):
    """Who owns each deployment and model (``team/NAME`` or ``operator``), kept where every replica of
    the orchestrator reads and writes it (the orchestrator's store): no decision rests on a copy that
    another replica may have changed since."""

    async def owner(self, kind: str, name: str) -> str | None: ...

    async def owned(self, kind: str, owner: str) -> set[str]: ...

    async def owned_deployments(self, owner: str) -> dict[str, int]:
        """The deployments ``owner`` holds now, each with its creation time (unix ms): which one of
        the deployments a name has had is the owner's."""
        ...

    async def claim(self, kind: str, name: str, owner: str) -> str:
        """Record ``owner`` for a name nobody holds yet (one claim wins, across replicas); returns the
        owner the name has now."""
        ...

    async def forget(self, kind: str, name: str, owner: str | None = None) -> None:
        """Drop the owner of ``name`` (only if it is ``owner``, when given)."""
        ...


def legacy_owners(path: Path) -> list[tuple[str, str, str]]:
    """The (kind, name, owner) rows of the ownership file of earlier releases (``owners.sqlite`` in
    the state directory), to be moved into the store; [] if there is none."""
    if not path.exists():
        return []
    db = sqlite3.connect(path)  # closing the last connection folds its WAL back into the file
    try:
        return [(str(k), str(n), str(o)) for k, n, o in db.execute("SELECT kind, name, owner FROM owners")]
    except sqlite3.OperationalError:  # no table: nothing was ever recorded
        return []
    finally:
        db.close()


def team_of(owner: str | None) -> str:
    """The team in an owner record (``team/NAME`` -> NAME); "" for an operator's object or nobody's."""
    return owner[len("team/") :] if owner is not None and owner.startswith("team/") else ""


def may_use(identity: Identity | None, teams: Iterable[str]) -> bool:
    """Whether ``identity`` may use what a node holds for ``teams`` (the owner teams of everything
    behind one name: its replicas, and a multi-exit model's own owner and its stages'; "" for what no
    team owns): a team certificate only if none of it belongs to another team; operators and nodes
    (multi-exit hand-offs) everything, and so does a caller without TLS (None). Nothing held (no
    teams) is no refusal: the lookup answers that the model is not there."""
    if identity is None or identity.team is None:
        return True
    return set(teams) <= {"", identity.team}


# ---------------------------------------------------------------- rules


class InvalidRequest(Exception):
    """A request check refused the request itself (INVALID_ARGUMENT); ``str()`` is the detail."""


@dataclass(frozen=True, slots=True)
class Checked:
    """What a method's request check (`AuthzInterceptor` ``checks``) made of one request: the
    validated ``value`` the handler works on, the object it targets and the model it uses. The
    ownership rules judge these, so what is authorized is exactly what the handler acts on."""

    request: Any
    value: Any
    target: str | None
    uses: str | None = None
    #: a multi-exit stage: the pipeline it joins, and the other deployments already in it
    pipeline: str | None = None
    stages: frozenset[str] = frozenset()


RequestCheck = Callable[[Any], Awaitable[Checked]]

# Set by the interceptor for the handler's task: who is calling, and the checked request.
_CALLER: ContextVar[Identity | None] = ContextVar("edgeward_caller", default=None)
_CHECKED: ContextVar[Checked | None] = ContextVar("edgeward_checked", default=None)
_REFUSED: ContextVar[bool] = ContextVar("edgeward_refused", default=False)


def caller() -> Identity | None:
    """The authenticated identity of the call being handled (None on a server without TLS)."""
    return _CALLER.get()


def checked_value(request: Any) -> Any:
    """The value the interceptor's check made of ``request`` (None if it did not check this one)."""
    checked = _CHECKED.get()
    return checked.value if checked is not None and checked.request is request else None


@dataclass(frozen=True, slots=True)
class MethodRule:
    """Who may call one method, and what a team's call touches.

    ``target`` names the object a call is about; for team callers ``kind`` objects must be
    theirs. ``claims``: a successful call makes the caller the owner of a new object; ``releases``:
    a successful call forgets the owner. ``mutating`` calls are audited even when allowed.
    """

    roles: frozenset[Role]
    kind: str | None = None
    target: Callable[[Any], str | None] | None = None
    mutating: Callable[[Any], bool] | bool = False
    claims: bool = False
    releases: bool = False

    def is_mutating(self, request: Any) -> bool:
        return self.mutating(request) if callable(self.mutating) else self.mutating


_TEAM = frozenset({Role.OPERATOR, Role.TEAM})
_D = "/edgeward.v1.DeploymentService/"
_M = "/edgeward.v1.ModelService/"
_N = "/edgeward.v1.NodeService/"
RULES: dict[str, MethodRule] = {
    # The target of Apply is the name in the validated manifest (a request check, `Checked`).
    _D + "Apply": MethodRule(_TEAM, DEPLOYMENT, None, mutating=lambda r: not r.dry_run, claims=True),
    _D + "Get": MethodRule(_TEAM, DEPLOYMENT, lambda r: r.name),
    _D + "List": MethodRule(_TEAM),
    _D + "Delete": MethodRule(_TEAM, DEPLOYMENT, lambda r: r.name, mutating=True, releases=True),
    _D + "Watch": MethodRule(_TEAM, DEPLOYMENT, lambda r: r.name or None),
    _M + "Push": MethodRule(_TEAM, MODEL, lambda r: r.metadata.name or None, mutating=True, claims=True),
    _M + "List": MethodRule(_TEAM),
    _M + "Get": MethodRule(_TEAM, MODEL, lambda r: r.name),
    _M + "Download": MethodRule(frozenset({Role.OPERATOR, Role.TEAM, Role.NODE}), MODEL, lambda r: r.name),
    _M + "History": MethodRule(_TEAM, MODEL, lambda r: r.name),
    _M + "Deprecate": MethodRule(_TEAM, MODEL, lambda r: r.name, mutating=True),
    _M + "Revoke": MethodRule(_TEAM, MODEL, lambda r: r.name, mutating=True),
    _N + "Cordon": MethodRule(frozenset({Role.OPERATOR}), None, lambda r: r.node_id, mutating=True),
    _N + "Drain": MethodRule(frozenset({Role.OPERATOR}), None, lambda r: r.node_id, mutating=True),
    "/edgeward.v1.AttestationService/AttestNow": MethodRule(
        frozenset({Role.OPERATOR}), None, lambda r: r.node_id, mutating=True
    ),
    **{method: MethodRule(_ANY_ROLE) for method in STANDARD_METHODS},  # health, reflection v1alpha and v1
}
_READ_ONLY = ("Get", "List", "Watch", "Query", "History", "Placements", "Compliance", "Check")
_OPERATOR_READS = MethodRule(frozenset({Role.OPERATOR}))
_OPERATOR_WRITES = MethodRule(frozenset({Role.OPERATOR}), mutating=True)


def rule_for(method: str) -> MethodRule:
    """The rule of a full method name; anything not listed is for operators only, and audited unless
    its name says it only reads."""
    rule = RULES.get(method)
    if rule is not None:
        return rule
    return _OPERATOR_READS if method.rsplit("/", 1)[-1].startswith(_READ_ONLY) else _OPERATOR_WRITES


def _target_text(rule: MethodRule, name: str | None) -> str:
    if not name:
        return ""
    if rule.kind is None:
        return f"node/{name}"
    return f"{rule.kind}/{name}"


# ---------------------------------------------------------------- decisions


class RevocationWatch:
    """The open response streams, by certificate serial: when the CRL revokes a certificate, its
    streams are ended within one CRL re-read (``interval_s``), idle ones too. The watching task runs
    only while streams are open."""

    def __init__(self, revocations: RevocationList, interval_s: float = 1.0) -> None:
        self.revocations = revocations
        self.interval_s = interval_s
        self._open: dict[asyncio.Event, int] = {}
        self._task: asyncio.Task[None] | None = None

    def open(self, identity: Identity) -> asyncio.Event:
        event = asyncio.Event()
        self._open[event] = identity.serial
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="edgeward-revocation-watch")
        return event

    def close(self, event: asyncio.Event) -> None:
        self._open.pop(event, None)

    async def _run(self) -> None:
        while self._open:
            await asyncio.sleep(self.interval_s)
            revoked = self.revocations.refresh()
            for event, serial in list(self._open.items()):
                if serial in revoked:
                    event.set()


class Authenticator:
    """Who a peer certificate speaks for (cached per certificate), and whether it is revoked."""

    def __init__(self, revocations: RevocationList | None = None) -> None:
        self.revocations = revocations
        self._identities: dict[bytes, Identity] = {}
        self._watch = RevocationWatch(revocations) if revocations is not None else None

    async def stream(self, identity: Identity, items: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """A response stream of ``identity`` that ends with `StreamCut` once its certificate is revoked."""
        if self._watch is None:
            async for item in items:
                yield item
            return
        event = self._watch.open(identity)
        try:
            async for item in until_set(event, items):
                yield item
        finally:
            self._watch.close(event)

    def identify(self, pem: bytes | None) -> Identity:
        if not pem:
            raise Denied(
                "security.authn.no_certificate", "no client certificate", grpc.StatusCode.UNAUTHENTICATED
            )
        identity = self._identities.get(pem)
        if identity is None:
            try:
                identity = Identity.from_pem(pem)
            except IdentityError as err:
                raise Denied(err.reason, err.detail, grpc.StatusCode.UNAUTHENTICATED) from err
            if len(self._identities) >= _IDENTITY_CACHE:
                self._identities.clear()
            self._identities[pem] = identity
        return identity

    def check_revoked(self, identity: Identity) -> None:
        if self.revocations is not None and self.revocations.is_revoked(identity.serial):
            raise Denied(
                "security.authn.revoked",
                f"certificate {identity.serial:x} of {identity} is revoked",
                grpc.StatusCode.UNAUTHENTICATED,
            )

    def peer(self, context: grpc.aio.ServicerContext) -> Identity:
        """The unrevoked identity of the call's client certificate (`Denied` otherwise)."""
        identity = self.identify(client_pem(context))
        self.check_revoked(identity)
        return identity


class Authorizer(Authenticator):
    """The decisions, without gRPC: identity checks, role rules, ownership.

    ``exists(kind, name)`` tells whether an object exists in the orchestrator's store; an existing
    object without a recorded owner (created before ownership was recorded) belongs to operators.
    """

    def __init__(
        self,
        owners: Owners,
        *,
        revocations: RevocationList | None = None,
        exists: Callable[[str, str], Awaitable[bool]] | None = None,
    ) -> None:
        super().__init__(revocations)
        self.owners = owners
        self._exists = exists

    def check_role(self, identity: Identity, method: str, rule: MethodRule) -> None:
        if identity.role not in rule.roles:
            raise Denied("security.authz.role", f"{identity.role} may not call {method}")

    async def check(self, identity: Identity, method: str, rule: MethodRule, name: str | None) -> bool:
        """Raise `Denied` unless ``identity`` may make this call; True if it claimed a new object."""
        self.check_role(identity, method, rule)
        if identity.role is not Role.TEAM or rule.kind is None or name is None:
            return False
        owner = await self.owners.owner(rule.kind, name)
        if owner == identity.owner:
            return False
        if (
            owner is None
            and rule.claims
            and not await self._exists_(rule.kind, name)
            # A multi-exit pipeline's name is a model name: one deployments serve already (an
            # operator's, whose Apply records no owner) is taken, or a push of a model of that name
            # would own the pipeline, and let the team splice its stages into it.
            and not (rule.kind == MODEL and await self._exists_(PIPELINE, name))
        ):
            owner = await self.owners.claim(rule.kind, name, identity.owner)  # one claim wins
            if owner == identity.owner:
                return True
        raise Denied(
            "security.authz.not_owner",
            f"{rule.kind} {name!r} belongs to {owner or OPERATOR_OWNER}, not {identity.owner}",
        )

    async def check_model_use(self, identity: Identity, model: str | None) -> None:
        """A team's deployment may only run a model the team owns."""
        if (
            identity.role is Role.TEAM
            and model is not None
            and await self.owners.owner(MODEL, model) != identity.owner
        ):
            raise Denied(
                "security.authz.model_not_owned", f"model {model!r} does not belong to {identity.owner}"
            )

    async def check_pipeline(self, identity: Identity, checked: Checked) -> bool:
        """A team's multi-exit stage may only join a pipeline of its own; True if it claimed a new one.

        Nodes serve a multi-exit model under its pipeline name, ahead of a plain model of that name,
        and the orchestrator wires every deployment that names the pipeline into it: a pipeline name
        is a model name (recorded as one). A name nobody holds yet belongs to the owners of the
        deployments already in the pipeline (operators for a model of that name that predates
        ownership); a team that is the only one there, or finds nothing, claims it."""
        pipeline = checked.pipeline
        if identity.role is not Role.TEAM or pipeline is None:
            return False
        owner = await self.owners.owner(MODEL, pipeline)
        if owner == identity.owner:
            return False
        if owner is None:
            others = {await self.owners.owner(DEPLOYMENT, d) or OPERATOR_OWNER for d in checked.stages}
            others.discard(identity.owner)
            if not others and not await self._exists_(MODEL, pipeline):
                owner = await self.owners.claim(MODEL, pipeline, identity.owner)
                if owner == identity.owner:
                    return True
            owner = owner or min(others, default=OPERATOR_OWNER)
        raise Denied(
            "security.authz.pipeline_not_owned",
            f"multiExit.pipeline {pipeline!r} belongs to {owner}, not {identity.owner}",
        )

    async def _exists_(self, kind: str, name: str) -> bool:
        return False if self._exists is None else await self._exists(kind, name)

    async def visible(self, identity: Identity, kind: str, names: Iterable[str]) -> set[str]:
        """Which of ``names`` the identity may see."""
        if identity.role is not Role.TEAM:
            return set(names)
        return set(names) & await self.owners.owned(kind, identity.owner)


# ---------------------------------------------------------------- gRPC


async def _filter_response(method: str, identity: Identity, authz: Authorizer, response: Any) -> Any:
    if identity.role is not Role.TEAM:
        return response
    if method == _D + "List":
        mine = await authz.visible(identity, DEPLOYMENT, (d.name for d in response.deployments))
        return api_pb2.ListDeploymentsResponse(
            deployments=[d for d in response.deployments if d.name in mine]
        )
    if method == _M + "List":
        mine = await authz.visible(identity, MODEL, (m.name for m in response.models))
        return api_pb2.ListModelsResponse(models=[m for m in response.models if m.name in mine])
    return response


class TeamWatch:
    """Which events of a DeploymentService/Watch stream a team sees: its own deployments', and for a
    name the stream showed as the team's, a DELETED once the deployment under it is not the team's.

    An event carries the deployment as it was when the event was built, which may be long before
    the stream sends it, and a name may have changed hands since (deleted by one team, created by
    another). So an event is the team's when its deployment, name and creation time, is one the team
    holds (``Owners.owned_deployments``), read again whenever an event names a deployment the stream
    has not classified. What the stream showed is kept apart from what it read: a name shown and no
    longer the team's gets a DELETED (even when the stream's own DELETED was built as a MODIFIED of
    the next owner's deployment); a deployment shown for the first time is sent as ADDED."""

    def __init__(self, authz: Authorizer, identity: Identity) -> None:
        self._authz = authz
        self._identity = identity
        self._owned: dict[str, int] = {}  # the team's deployments at the last read: name -> created
        self._shown: dict[str, int] = {}  # what this stream showed as the team's: name -> created
        self._theirs: dict[str, int] = {}  # deployments it found another's: name -> created

    async def shows(self, event: Any) -> Any | None:
        """The event to send (``event``, a DELETED or an ADDED in its place), or None."""
        name = event.deployment.name
        if event.type == api_pb2.WATCH_EVENT_TYPE_DELETED:
            self._theirs.pop(name, None)
            return event if self._shown.pop(name, None) is not None else None
        created = event.deployment.created_unix_ms
        if created not in (self._owned.get(name), self._theirs.get(name)):  # not classified yet
            self._owned = await self._authz.owners.owned_deployments(self._identity.owner)
        if self._owned.get(name) == created:
            self._theirs.pop(name, None)
            if self._shown.get(name) == created:
                return event
            self._shown[name] = created  # new to this stream as the team's: ADDED
            return api_pb2.DeploymentEvent(
                type=api_pb2.WATCH_EVENT_TYPE_ADDED, deployment=event.deployment, revision=event.revision
            )
        self._theirs[name] = created
        if self._shown.pop(name, None) is not None:  # shown as the team's: it is gone for the team
            return api_pb2.DeploymentEvent(
                type=api_pb2.WATCH_EVENT_TYPE_DELETED,
                deployment=api_pb2.Deployment(name=name),
                revision=event.revision,
            )
        return None


class AuthzInterceptor(RequestGuard):
    """Enforces `RULES` on every call of a server that requires client certificates.

    ``checks`` validate the request of a method before it is authorized (Apply: the manifest is
    parsed and validated once, off the event loop); the handler gets the checked value through
    `checked_value` and the caller through `caller`. Every refusal, including requests that do
    not decode or do not pass their check (INVALID_ARGUMENT), is audited."""

    def __init__(
        self, authz: Authorizer, audit: AuditLog, checks: Mapping[str, RequestCheck] | None = None
    ) -> None:
        self.authz = authz
        self.audit = audit
        self.checks = dict(checks or {})
        self.denied = 0
        self.watches: dict[str, int] = {}  # open Watch streams per certificate (CN)
        unchecked = [m for m, r in RULES.items() if r.kind and r.target is None and m not in self.checks]
        if unchecked:  # their target is known only from a check: without it they would go unchecked
            raise ValueError(f"these methods need a request check: {', '.join(unchecked)}")

    # ---- shared steps

    async def _admit(
        self, method: str, rule: MethodRule, request: Any, context: grpc.aio.ServicerContext
    ) -> tuple[Identity, str | None, list[tuple[str, str]]]:
        """Identify, check and authorize; on refusal audit and abort (raises). Sets `caller` and
        `checked_value` for the handler. Returns the names the call reserved for the caller, as
        (kind, name): kept if it succeeds, released otherwise (`_settle`)."""
        identity: Identity | None = None
        name: str | None = None
        claims: list[tuple[str, str]] = []
        try:
            identity = self.authz.identify(client_pem(context))
            self.authz.check_revoked(identity)  # after identify: the audit line names the revoked one
            self.authz.check_role(identity, method, rule)
            if isinstance(request, Undecodable):
                raise Denied(UNDECODABLE, str(request).partition(": ")[2], grpc.StatusCode.INVALID_ARGUMENT)
            checked = await self._check(method, request)
            _CHECKED.set(checked)
            if checked is not None:
                name = checked.target
                await self.authz.check_model_use(identity, checked.uses)
            elif rule.target is not None and request is not None:
                name = rule.target(request)
                if name is not None and len(name) > MAX_NAME:  # no object has such a name
                    raise Denied(
                        "request.name_too_long",
                        f"a name of {len(name)} characters, at most {MAX_NAME}",
                        grpc.StatusCode.INVALID_ARGUMENT,
                    )
            if method == _M + "Push" and (request is None or not request.metadata.name):
                # The first message names the model that ownership is checked on: a push that leads
                # with anything else (an empty message, a chunk) would be checked on no name at all.
                raise Denied(
                    "model.push.no_metadata",
                    "the first message must carry the metadata, with the model's name",
                    grpc.StatusCode.INVALID_ARGUMENT,
                )
            if method == _M + "Push":
                claimed = request.metadata.owner_team
                if claimed not in ("", identity.team or ""):
                    raise Denied(
                        "security.authz.owner_team",
                        f"owner_team comes from the caller's certificate: {identity} cannot name team {claimed!r}",
                    )
            # Last: they may reserve the names of new objects for this caller.
            if await self.authz.check(identity, method, rule, name):
                claims.append((rule.kind or "", name or ""))
            if checked is not None and await self.authz.check_pipeline(identity, checked):
                claims.append((MODEL, checked.pipeline or ""))
        except Denied as denial:
            for kind, claimed in claims:
                await self.authz.owners.forget(kind, claimed, identity.owner if identity else None)
            await self._refused(method, rule, identity, name, context, denial)
            raise AssertionError("unreachable: abort raises") from denial
        _CALLER.set(identity)
        return identity, name, claims

    async def _identified(self, method: str, rule: MethodRule, context: grpc.aio.ServicerContext) -> Identity:
        """The caller, when its certificate is valid, not revoked, and of a role that may call
        ``method``; else the call is audited and aborted (raises). What the request asks is checked
        later, by :meth:`_admit`."""
        identity: Identity | None = None
        try:
            identity = self.authz.identify(client_pem(context))
            self.authz.check_revoked(identity)
            self.authz.check_role(identity, method, rule)
        except Denied as denial:
            await self._refused(method, rule, identity, None, context, denial)
            raise AssertionError("unreachable: abort raises") from denial
        return identity

    async def _check(self, method: str, request: Any) -> Checked | None:
        check = self.checks.get(method)
        if check is None or request is None:
            return None
        try:
            return await check(request)
        except InvalidRequest as err:
            raise Denied("request.invalid", str(err), grpc.StatusCode.INVALID_ARGUMENT) from err

    async def _refused(
        self,
        method: str,
        rule: MethodRule,
        identity: Identity | None,
        name: str | None,
        context: grpc.aio.ServicerContext,
        denial: Denied,
    ) -> None:
        self.denied += 1
        # The text, not the exception: a kept log record would keep the request through its traceback.
        text = bounded(str(denial), MAX_REASON)
        log.warning("refused %s to %s: %s", method, identity or context.peer(), text)
        await self.audit.record(
            AuditEntry.make(
                identity, context.peer(), method, _target_text(rule, name), denial.code.name, str(denial)
            )
        )
        await context.abort(denial.code, text)

    async def refuse(self, method: str, bad: Undecodable, context: grpc.aio.ServicerContext) -> None:
        """A later message of a request stream did not decode: audited, then the call ends (raises)."""
        _REFUSED.set(True)  # this call's refusal has its audit line (see _settle)
        denial = Denied(UNDECODABLE, str(bad).partition(": ")[2], grpc.StatusCode.INVALID_ARGUMENT)
        await self._refused(method, rule_for(method), caller(), None, context, denial)

    async def _cut(
        self, method: str, rule: MethodRule, identity: Identity, context: grpc.aio.ServicerContext
    ) -> None:
        """End a stream whose certificate was revoked while it was open (raises)."""
        denial = Denied(
            "security.authn.revoked",
            f"certificate {identity.serial:x} of {identity} was revoked; stream closed",
            grpc.StatusCode.UNAUTHENTICATED,
        )
        await self._refused(method, rule, identity, None, context, denial)

    async def _unless_revoked(
        self, method: str, rule: MethodRule, identity: Identity, context: grpc.aio.ServicerContext
    ) -> None:
        """End a request stream (a push) whose certificate was revoked while it was open (raises)."""
        if self.authz.revocations is not None and self.authz.revocations.is_revoked(identity.serial):
            _REFUSED.set(True)  # this call's refusal has its audit line (see _settle)
            await self._cut(method, rule, identity, context)

    async def _settle(
        self,
        method: str,
        rule: MethodRule,
        identity: Identity,
        name: str | None,
        claims: list[tuple[str, str]],
        request: Any,
        context: grpc.aio.ServicerContext,
        failed: BaseException | None,
    ) -> None:
        """After the handler: record ownership changes, audit mutating calls."""
        ok = failed is None
        owners = self.authz.owners
        mutating = not isinstance(request, Undecodable) and rule.is_mutating(request)
        for kind, claimed in claims:  # kept by a call that made its object, else (dry run too) released
            if not (ok and mutating):
                await owners.forget(kind, claimed, identity.owner)
        if ok and name is not None and rule.kind is not None and mutating:
            if rule.releases:
                await owners.forget(rule.kind, name)
            elif rule.claims and await owners.owner(rule.kind, name) is None:  # an operator's new object
                await owners.claim(rule.kind, name, identity.owner)
        if _REFUSED.get():
            return  # refused mid-stream: audited by refuse()
        if mutating or (failed is not None and _refusal(context)):
            code = context.code()
            result = "OK" if ok else _code_name(code) if code is not None else type(failed).__name__
            await self.audit.record(
                AuditEntry.make(
                    identity, context.peer(), method, _target_text(rule, name), result, _detail(context)
                )
            )

    # ---- per call shape

    def unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        rule = rule_for(method)

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            identity, name, claims = await self._admit(method, rule, request, context)
            try:
                response = await behavior(request, context)
            except BaseException as err:
                await self._settle(method, rule, identity, name, claims, request, context, err)
                raise
            await self._settle(method, rule, identity, name, claims, request, context, None)
            return await _filter_response(method, identity, self.authz, response)

        return call

    def ustream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        rule = rule_for(method)
        watch = method.endswith("/Watch")

        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            identity, _name, _claims = await self._admit(method, rule, request, context)
            who = identity.common_name
            if watch:  # each holds a queue of up to a thousand changes while its client does not read
                if self.watches.get(who, 0) >= MAX_WATCHES:
                    denial = Denied(
                        "request.streams",
                        f"{who} has {MAX_WATCHES} Watch streams open, at most {MAX_WATCHES}",
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                    )
                    await self._refused(method, rule, identity, None, context, denial)
                self.watches[who] = self.watches.get(who, 0) + 1
            try:
                async for item in self._watched(method, rule, identity, behavior(request, context), context):
                    yield item
            finally:
                if watch:
                    self.watches[who] -= 1
                    if not self.watches[who]:
                        del self.watches[who]

        return call

    async def _watched(
        self,
        method: str,
        rule: MethodRule,
        identity: Identity,
        items: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[Any]:
        """A response stream as the caller may see it: a team's Watch only its own deployments; ended
        once the caller's certificate is revoked."""
        team_watch = (
            TeamWatch(self.authz, identity) if identity.role is Role.TEAM and method == _D + "Watch" else None
        )
        try:
            async for item in self.authz.stream(identity, items):
                if team_watch is not None and (item := await team_watch.shows(item)) is None:
                    continue
                yield item
        except StreamCut:
            await self._cut(method, rule, identity, context)

    def sunary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        rule = rule_for(method)

        async def call(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            # Who calls is settled before anything is read: a revoked or wrong-role certificate holds
            # no stream open waiting for its first message, and nobody waits longer than FIRST_MESSAGE_S.
            identity = await self._identified(method, rule, context)
            try:
                async with asyncio.timeout(FIRST_MESSAGE_S):
                    # The first message (a model push's metadata) names the target; handed on unchanged.
                    first = await anext(aiter(requests), None)
            except TimeoutError:
                denial = Denied(
                    "request.first_message_late",
                    f"no message within {FIRST_MESSAGE_S:g} s",
                    grpc.StatusCode.INVALID_ARGUMENT,
                )
                await self._refused(method, rule, identity, None, context, denial)
                raise
            identity, name, claims = await self._admit(method, rule, first, context)
            rest = self.checked(method, requests, context)

            async def replay() -> AsyncIterator[Any]:
                if first is not None:
                    yield first
                async for item in rest:
                    await self._unless_revoked(method, rule, identity, context)
                    yield item
                # The handler acts once the stream ends (a push publishes): not for a revoked caller.
                await self._unless_revoked(method, rule, identity, context)

            try:
                response = await behavior(replay(), context)
            except BaseException as err:
                await self._settle(method, rule, identity, name, claims, first, context, err)
                raise
            await self._settle(method, rule, identity, name, claims, first, context, None)
            return response

        return call

    def sstream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        rule = rule_for(method)

        async def call(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            identity, _name, _claims = await self._admit(method, rule, None, context)
            try:
                async for item in self.authz.stream(
                    identity, behavior(self.checked(method, requests, context), context)
                ):
                    yield item
            except StreamCut:
                await self._cut(method, rule, identity, context)

        return call


class RoleGuard(RequestGuard):
    """Mutual TLS callers of a server without ownership rules (a node's inference API): a caller
    needs a certificate of one of ``roles`` that is not revoked. Refusals are logged and counted."""

    def __init__(self, roles: Iterable[Role], revocations: RevocationList | None = None) -> None:
        self.roles = frozenset(roles)
        self.authn = Authenticator(revocations)
        self.denied = 0

    async def admit(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        try:
            identity = self.authn.peer(context)
            if identity.role not in self.roles:
                raise Denied("security.authz.role", f"{identity.role} may not call {method}")
        except Denied as denial:
            self.denied += 1
            log.warning("refused %s to %s: %s", method, context.peer(), str(denial))
            await context.abort(denial.code, str(denial))
            raise AssertionError("unreachable: abort raises") from denial
        _CALLER.set(identity)
        await super().admit(method, request, context)

    async def responses(
        self, method: str, items: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        identity = caller()
        assert identity is not None  # admit() ran first
        try:
            async for item in self.authn.stream(identity, items):
                yield item
        except StreamCut:
            log.warning("closed %s of %s: its certificate was revoked", method, identity)
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"security.authn.revoked: certificate {identity.serial:x} of {identity} was revoked",
            )


def _refusal(context: grpc.aio.ServicerContext) -> bool:
    """Whether the call ended with INVALID_ARGUMENT (a refusal of the request: always audited)."""
    return context.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT.value[0])


def _code_name(code: Any) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.name
    return str(code)


def _detail(context: grpc.aio.ServicerContext) -> str:
    try:
        return context.details() or ""
    except Exception:  # not every grpc version exposes details() on aio contexts
        return ""


def client_pem(context: grpc.aio.ServicerContext) -> bytes | None:
    """The PEM of the call's client certificate, if it presented one."""
    certs = list(context.auth_context().get("x509_pem_cert") or ())
    return certs[0] if certs else None
