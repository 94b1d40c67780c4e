"""The interceptor chain every RPC passes:

    authenticate -> rate limit -> authorize (policy) -> audit (fail closed) -> servicer

Servicers raise domain errors; this module turns them into status codes (through
`broker.api.status`) after the audit event, carrying the outcome, has been committed.

A unary call goes through four steps: admission (correlation id, then `_authorize`),
invocation (the servicer under its `CallContext`), the audit event (`audit_event`, a pure
function of the call's `CallOutcome`) and finishing (sampling, ledger, metrics, answer).
Health checks and reflection are authenticated, rate limited and authorized like everything
else but not written to the ledger (they carry no data and would drown it).

A unary call's work (servicer and audit write) runs in a task of its own that the client
cannot cancel: when the client goes away or its deadline passes, the work finishes and its
event is written with the outcome CANCELLED or DEADLINE_EXCEEDED and `effect` saying whether
the change took effect (`applied`, `none`, or `unknown` after an unexpected error). So no
change is ever made without its event.

Refusals by the rate limiter, and calls without an identity refused on the attestation port,
are counted (`broker_refusals`) and sampled into the ledger: one event per caller (or peer
address) per interval, carrying the previous interval's count (`broker.ratelimit.RefusalSampler`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import inspect
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from broker import metrics
from broker.audit import AuditEvent, AuditLedger
from broker.authn import Authenticator
from broker.errors import (
    AuditWriteFailed,
    BrokerError,
    Denylisted,
    InvalidArgument,
    PermissionDenied,
    RateLimited,
    ResourceExhausted,
    Unauthenticated,
)
from broker.policy import Caller, Decision, Policy
from broker.ratelimit import RateLimiter, RefusalSampler
from ca import errors as ca_errors
from ca.clock import Clock

from ..status import to_status
from .binding import MethodSpec

if TYPE_CHECKING:  # tracing code is imported only when tracing is on (broker.tracing)
    from broker.tracing.server import RequestSpan, RequestSpans

__all__ = ["CallContext", "CallOutcome", "RequestPipeline", "audit_event", "current_call"]

CORRELATION_HEADER = "x-correlation-id"
JUSTIFICATION_HEADER = "x-broker-justification"
_CORRELATION_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_MAX_JUSTIFICATION = 1024
# The bound on every `*_seconds` field of a request (TTLs, periods, increments): 100 years.
# Larger values (up to +-2^63) would overflow date arithmetic deep in the domain code.
MAX_DURATION_SECONDS = 100 * 366 * 86_400
DEFAULT_REFUSAL_AUDIT_INTERVAL = 10.0


@dataclass
class CallContext:
    caller: Caller
    correlation_id: str
    justification: str
    details: dict[str, Any] = field(default_factory=dict)
    action: str = ""
    resource: str = ""
    decision: Decision | None = None
    policy: Policy | None = None

    def authorize(
        self,
        resource: str,
        attributes: Mapping[str, str] | None = None,
        *,
        action: str | None = None,
    ) -> Decision:
        """The deferred policy decision (see `MethodSpec.deferred`): raises PermissionDenied
        when refused. `resource` replaces the one the audit event names (e.g. a hash of a
        secret reference instead of the reference)."""
        if self.policy is None:
            raise PermissionDenied("this call was authorized by the pipeline already")
        self.resource = resource
        decision = self.policy.decide(
            self.caller,
            action or self.action,
            resource,
            attributes=attributes,
            context={"justification": self.justification},
        )
        if self.decision is None or self.decision.allowed:
            self.decision = decision  # a refusal sticks: later allows do not clear it
        if not decision.allowed:
            raise PermissionDenied(decision.reason)
        return decision

    async def settle(self) -> None:
        """After `authorize`, when the decision spent a single-use approval or break-glass
        credential: wait until the use is recorded in storage. For servicers whose change takes
        effect once stored (a registration entry, an attestor), so withholding the answer later
        would not undo it. PermissionDenied when another worker or replica used it first."""
        settle = getattr(self.policy, "settle", None)
        decision = self.decision
        if settle is None or decision is None or not decision.allowed:
            return
        if not decision.flags.get("approval") and decision.rule != "break-glass":
            return
        if not await settle(decision):
            raise PermissionDenied(
                "the approval or break-glass credential this request used was already used"
            )


_CURRENT: contextvars.ContextVar[CallContext] = contextvars.ContextVar("broker_call")


def current_call() -> CallContext:
    """The context of the request being served (set by the pipeline before the servicer)."""
    return _CURRENT.get()


def peer_host(peer: str) -> str:
    """The host part of a gRPC peer string ("ipv4:10.0.0.1:5555" -> "10.0.0.1")."""
    host = peer
    if peer.startswith(("ipv4:", "ipv6:")):
        host = peer.split(":", 1)[1].rsplit(":", 1)[0]
    return host[:200]


def bootstrap_caller(peer: str) -> Caller:
    """The caller of a bootstrap RPC without a client certificate, named by its host (so the
    rate limit applies per host, not per connection)."""
    return Caller(f"bootstrap:{peer_host(peer)}", False, {})


_DURATION_FIELDS: dict[str, tuple[Any, ...]] = {}


def _duration_fields(descriptor: Any) -> tuple[Any, ...]:
    """The `*_seconds` integer fields and the message fields that may hold some, of one
    message type (cached per type; recursive types are cut at the second visit)."""
    cached = _DURATION_FIELDS.get(descriptor.full_name)
    if cached is not None:
        return cached
    _DURATION_FIELDS[descriptor.full_name] = ()  # breaks cycles
    found = []
    for field_ in descriptor.fields:
        if field_.message_type is not None:
            if _duration_fields(field_.message_type):
                found.append(field_)
        elif field_.name.endswith("_seconds") and field_.cpp_type in _INT_TYPES:
            found.append(field_)
    _DURATION_FIELDS[descriptor.full_name] = result = tuple(found)
    return result


_INT_TYPES = frozenset({1, 2, 3, 4})  # FieldDescriptor.CPPTYPE_INT32/INT64/UINT32/UINT64


def check_durations(message: Any, path: str = "") -> None:
    """Raises InvalidArgument when a `*_seconds` field anywhere in `message` lies beyond
    +-MAX_DURATION_SECONDS (the domain checks the sign and its own limits)."""
    for field_ in _duration_fields(message.DESCRIPTOR):
        value = getattr(message, field_.name)
        name = f"{path}{field_.name}"
        if field_.message_type is not None:
            if field_.is_repeated:
                if field_.message_type.GetOptions().map_entry:
                    continue  # maps of messages carry no durations in our API
                for item in value:
                    check_durations(item, f"{name}.")
            elif message.HasField(field_.name):
                check_durations(value, f"{name}.")
            continue
        values = value if field_.is_repeated else (value,)
        for number in values:
            if abs(number) > MAX_DURATION_SECONDS:
                raise InvalidArgument(
                    f"{name} = {number} is out of range: at most {MAX_DURATION_SECONDS} "
                    "seconds (100 years)"
                )


class _Cancellation:
    """Set by the RPC's own task when gRPC cancels it (client gone, deadline passed)."""

    outcome: grpc.StatusCode | None = None


@dataclass
class _StreamState:
    """What an audited stream's span needs at its end: the opening's outcome, a mid-stream
    refusal's, and how many messages were pushed."""

    opened: CallOutcome | None = None
    ended: CallOutcome | None = None
    sent: int = 0


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            out[key] = value
    return out


def _aborted_status(context: grpc.aio.ServicerContext) -> tuple[grpc.StatusCode, str]:
    """The status a servicer set with `context.abort` (UNKNOWN if gRPC does not say)."""
    code = context.code()
    details = context.details()
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return code, details if isinstance(details, str) else ""


class RequestPipeline(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(
        self,
        specs: Mapping[str, MethodSpec],
        authenticator: Authenticator,
        limiter: RateLimiter,
        policy: Policy,
        ledger: AuditLedger,
        clock: Clock,
        max_request_bytes: int = 1 << 20,
        observer: Callable[[AuditEvent], AuditEvent | None] | None = None,
        refusals: RefusalSampler | None = None,
        peers: Callable[[str], str | None] | None = None,
        spans: RequestSpans | None = None,
    ) -> None:
        self._max_request_bytes = max_request_bytes
        # OpenTelemetry (broker.tracing): a SERVER span per unary call when tracing is on;
        # None keeps the plain path (no tracing code runs).
        self._spans = spans
        # The client behind a connection that came through a ConnectionGate (`gate.py`).
        self._peers = peers
        self._refusals = refusals or RefusalSampler(clock, DEFAULT_REFUSAL_AUDIT_INTERVAL)
        # Sees every audited event after it is written (anomaly detection); an event it returns
        # is written to the ledger too.
        self._observer = observer
        # A policy that spends single-use permissions says so with `settle` (AccessControl).
        self._settle_use: Callable[[Decision], Awaitable[bool]] | None = getattr(
            policy, "settle", None
        )
        self._specs = specs
        self._auth = authenticator
        self._limiter = limiter
        self._policy = policy
        self._ledger = ledger
        self._clock = clock
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method: str = details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None:
            return None
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = wrapped
        return wrapped

    # -- wrapping -------------------------------------------------------------------------

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        spec = self._specs.get(method)
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                return await self._unary(method, spec, inner, request, context)

            return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, spec, handler.unary_stream, unary=True), **kwargs
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(method, spec, handler.stream_stream, unary=False), **kwargs
            )
        inner_su = handler.stream_unary

        async def stream_unary(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> Any:
            await self._admit(method, spec, None, context)
            return await inner_su(requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)

    def _streaming(
        self, method: str, spec: MethodSpec | None, inner: Callable[..., Any], *, unary: bool
    ) -> Callable[..., Any]:
        """A server-streaming handler behind admission, of the same kind as `inner`: gRPC
        serves an async generator by iterating it and a coroutine (one that answers with
        `context.write`, as the health service's Watch) by awaiting it, so the wrapper must be
        the same kind (iterating a coroutine is a TypeError that reached clients)."""

        if inspect.isasyncgenfunction(inner) and unary and spec is not None and spec.audited:
            if self._spans is not None:

                async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    async for item in self._traced_stream(method, spec, inner, request, context):
                        yield item

                return traced

            async def audited(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async for item in self._audited_stream(method, spec, inner, request, context):
                    yield item

            return audited

        if inspect.isasyncgenfunction(inner):

            async def generator(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await self._admit(method, spec, request if unary else None, context)
                async for item in inner(request, context):
                    yield item

            return generator

        async def writer(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._admit(method, spec, request if unary else None, context)
            return await inner(request, context)

        return writer

    async def _traced_stream(
        self,
        method: str,
        spec: MethodSpec,
        inner: Callable[..., Any],
        request: Any,
        context: grpc.aio.ServicerContext,
    ) -> Any:
        """`_audited_stream` inside one SERVER span for the whole stream (the agents' sync):
        its trace id is the stream's correlation id; it ends when the stream ends, with the
        stream's status (CANCELLED when the client went away), caller and decision, and
        `broker.stream.messages_sent`, the number of messages pushed."""
        assert self._spans is not None
        meta = _metadata(context)
        asked = meta.get(CORRELATION_HEADER, "")
        asked = asked if _CORRELATION_RE.match(asked) else ""
        state = _StreamState()
        cancellation = _Cancellation()
        with self._spans.serve(method, meta, asked) as traced:
            try:
                async for item in self._audited_stream(
                    method, spec, inner, request, context, traced.correlation_id, state
                ):
                    yield item
                    state.sent += 1  # resumed: gRPC wrote it and asks for the next
            except (asyncio.CancelledError, GeneratorExit):
                cancellation.outcome = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                raise  # a refusal: its status is on the outcome
            except Exception:
                cancellation.outcome = grpc.StatusCode.UNKNOWN  # what gRPC tells the client
                raise
            finally:
                outcome = state.opened
                if state.ended is not None and state.ended.error is not None:
                    outcome = state.ended  # refused mid-stream
                _finish_span(traced, outcome, cancellation)
                traced.messages_sent(state.sent)

    async def _audited_stream(
        self,
        method: str,
        spec: MethodSpec,
        inner: Callable[..., Any],
        request: Any,
        context: grpc.aio.ServicerContext,
        correlation_id: str | None = None,
        state: _StreamState | None = None,
    ) -> Any:
        """A server stream of an audited spec (the agents' sync stream): its opening is
        admitted and audited like a unary call — a refusal is one audit event and an error
        status, an admitted stream one "allow" event — and what it pushes afterwards is not
        (the changes it reports are audited where they are made). A domain error the servicer
        raises mid-stream (e.g. the agent was denylisted) ends the stream with its status and
        is audited as a refusal."""
        started = time.perf_counter()
        outcome = self._admission(method, spec, request, context, correlation_id=correlation_id)
        if state is not None:
            state.opened = outcome
        if outcome.call is not None:
            try:
                self._ledger.ensure_writable()
            except Exception as exc:
                outcome.failed(exc)
        refused = outcome.error is not None
        await self._finish(outcome, spec, context, _Cancellation(), started)
        if refused or outcome.call is None:
            return
        ended = CallOutcome(method, spec.action, outcome.correlation_id, outcome.justification)
        if state is not None:
            state.ended = ended
        # A refusal mid-stream is recorded as one: who and what, decision "deny".
        ended.seen.update(who=outcome.call.caller.spiffe_id, resource=outcome.call.resource)
        token = _CURRENT.set(outcome.call)
        try:
            async for item in inner(request, context):
                yield item
        except (BrokerError, ca_errors.CAError) as exc:
            ended.failed(exc)
        finally:
            # ValueError: closed from another context (the client went away).
            with contextlib.suppress(ValueError):
                _CURRENT.reset(token)
        if ended.error is not None:
            await self._finish(ended, spec, context, _Cancellation(), started)

    # -- the chain ------------------------------------------------------------------------

    def _where(self, context: grpc.aio.ServicerContext) -> str:
        """The client's address: gRPC's peer, or the client behind a connection gate."""
        peer: str = context.peer()
        if self._peers is not None and peer.startswith("unix-abstract:"):
            return self._peers(peer) or peer
        return peer

    def _authorize(
        self,
        method: str,
        spec: MethodSpec | None,
        request: Any,
        context: grpc.aio.ServicerContext,
        seen: dict[str, Any] | None = None,
    ) -> tuple[Caller, str, str, Decision | None]:
        """authenticate -> rate limit -> size limit -> authorize.

        Returns (caller, action, resource, decision) or raises a BrokerError; the decision is
        None for a deferred spec (its domain call decides). `seen` gets the
        caller ("who") and "resource" as soon as they are known, so that a refusal can still be
        audited with them."""
        seen = {} if seen is None else seen
        try:
            caller = self._auth.caller(context.auth_context(), method)
        except Unauthenticated:
            if spec is None or not spec.bootstrap:
                seen["sample"] = f"unauthenticated:{peer_host(self._where(context))}"
                raise
            caller = bootstrap_caller(self._where(context))
        except Denylisted as exc:
            # Audited under its own name and serial; a denylisted caller that floods is
            # rate limited (and then sampled) like anyone else.
            seen["who"], seen["serial"] = exc.spiffe_id, exc.serial
            if spec is not None and request is not None:
                seen["resource"] = spec.resource(request)
            self._limiter.check(exc.spiffe_id)
            raise
        seen["who"] = caller.spiffe_id
        if caller.minted_by:  # an SVID an operator minted: the ledger says whose it is
            seen["minted_by"] = caller.minted_by
        if spec is not None and request is not None:
            seen["resource"] = spec.resource(request)
        self._limiter.check(caller.spiffe_id)
        # The transport admits somewhat larger messages than this so that an oversized request
        # is refused here, where it is audited, rather than silently by gRPC.
        size = request.ByteSize() if request is not None else 0
        if size > self._max_request_bytes:
            raise ResourceExhausted(
                f"the request is {size} bytes, over the broker's limit of "
                f"{self._max_request_bytes} bytes"
            )
        if request is not None:
            check_durations(request)
        if spec is None:
            raise PermissionDenied(f"no policy covers {method}; refused")
        resource = seen.get("resource", "")
        if spec.deferred:
            return caller, spec.action, resource, None
        decision = self._policy.decide(caller, spec.action, resource)
        if not decision.allowed:
            seen["rule"] = decision.rule
            if decision.flags:
                seen["flags"] = decision.flags
            raise PermissionDenied(decision.reason)
        return caller, spec.action, resource, decision

    async def _settle(self, decision: Decision | None) -> None:
        """A decision that spent a single-use permission (an approval, a break-glass
        credential; see `broker.access.AccessControl.settle`) is recorded in storage before the
        answer leaves; if another process spent it first, the answer is withheld."""
        settle = self._settle_use
        if decision is None or not decision.allowed or settle is None:
            return
        if not decision.flags.get("approval") and decision.rule != "break-glass":
            return
        if not await settle(decision):
            raise PermissionDenied(
                "the approval or break-glass credential this request used was already used"
            )

    async def _admit(
        self, method: str, spec: MethodSpec | None, request: Any, context: grpc.aio.ServicerContext
    ) -> None:
        try:
            if spec is not None and spec.deferred:
                raise PermissionDenied(f"{method}: deferred authorization needs a unary RPC")
            self._authorize(method, spec, request, context)
        except BrokerError as exc:
            code, message = to_status(exc, "-")
            await context.abort(code, message)

    async def _unary(
        self,
        method: str,
        spec: MethodSpec | None,
        inner: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
        request: Any,
        context: grpc.aio.ServicerContext,
    ) -> Any:
        """Runs the call in a task gRPC cannot cancel (see the module docstring): on
        cancellation, waits for the work and its audit event, then lets the cancellation
        through."""
        cancellation = _Cancellation()
        if spec is not None and not spec.audited:  # health, reflection: nothing to record
            return await self._unary_work(method, spec, inner, request, context, cancellation)
        work = asyncio.ensure_future(
            self._unary_work(method, spec, inner, request, context, cancellation)
        )
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            if work.done():
                raise
            remaining = context.time_remaining()
            cancellation.outcome = (
                grpc.StatusCode.DEADLINE_EXCEEDED
                if remaining is not None and remaining <= 0
                else grpc.StatusCode.CANCELLED
            )
            while not work.done():
                try:
                    await asyncio.wait((work,))
                except asyncio.CancelledError:
                    continue  # cancelled again (e.g. server stop): the work still finishes
            if not work.cancelled():
                work.exception()  # retrieved: it was logged or audited already
            raise

    async def _unary_work(
        self,
        method: str,
        spec: MethodSpec | None,
        inner: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
        request: Any,
        context: grpc.aio.ServicerContext,
        cancellation: _Cancellation,
    ) -> Any:
        """admission -> invocation -> audit event -> finishing."""
        if self._spans is not None:
            return await self._traced_work(method, spec, inner, request, context, cancellation)
        started = time.perf_counter()
        outcome = self._admission(method, spec, request, context)
        if outcome.call is not None:
            await self._invocation(outcome, inner, request, context)
        return await self._finish(outcome, spec, context, cancellation, started)

    async def _traced_work(
        self,
        method: str,
        spec: MethodSpec | None,
        inner: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
        request: Any,
        context: grpc.aio.ServicerContext,
        cancellation: _Cancellation,
    ) -> Any:
        """`_unary_work` inside the call's SERVER span (broker.tracing.server), whose trace id
        is the call's correlation id; the span gets the outcome's status, caller, decision and
        hashed secret reference when the call ends, however it ends."""
        assert self._spans is not None
        started = time.perf_counter()
        meta = _metadata(context)
        asked = meta.get(CORRELATION_HEADER, "")
        asked = asked if _CORRELATION_RE.match(asked) else ""
        outcome: CallOutcome | None = None
        with self._spans.serve(method, meta, asked) as traced:
            try:
                outcome = self._admission(
                    method, spec, request, context, correlation_id=traced.correlation_id
                )
                if outcome.call is not None:
                    await self._invocation(outcome, inner, request, context)
                return await self._finish(outcome, spec, context, cancellation, started)
            finally:
                _finish_span(traced, outcome, cancellation)

    def _admission(
        self,
        method: str,
        spec: MethodSpec | None,
        request: Any,
        context: grpc.aio.ServicerContext,
        correlation_id: str | None = None,
    ) -> CallOutcome:
        """Reads the correlation id (unless tracing gave it: the trace id) and justification,
        then authenticates, rate limits and authorizes (`_authorize`). The outcome has a `call`
        when the request was admitted, an `error` when it was refused."""
        meta = _metadata(context)
        if correlation_id is None:
            correlation_id = meta.get(CORRELATION_HEADER, "")
            if not _CORRELATION_RE.match(correlation_id):
                # A caller's W3C trace (its traceparent) names the call even when this broker
                # does not trace; else 128 random bits as 32 hex digits, like uuid4().hex
                # without building a UUID object (a measurable share of the request path).
                correlation_id = ""
                if "traceparent" in meta:
                    from broker.tracing.server import trace_id_of

                    correlation_id = trace_id_of(meta) or ""
                correlation_id = correlation_id or os.urandom(16).hex()
        justification = meta.get(JUSTIFICATION_HEADER, "")[:_MAX_JUSTIFICATION]
        context.set_trailing_metadata(((CORRELATION_HEADER, correlation_id),))
        outcome = CallOutcome(
            method, spec.action if spec is not None else "", correlation_id, justification
        )
        try:
            caller, action, resource, verdict = self._authorize(
                method, spec, request, context, outcome.seen
            )
        except Exception as exc:  # audited as a refusal, mapped to a status when finishing
            outcome.failed(exc)
            return outcome
        outcome.verdict = verdict
        outcome.call = CallContext(
            caller,
            correlation_id,
            justification,
            action=action,
            resource=resource,
            policy=self._policy if verdict is None else None,
        )
        return outcome

    async def _invocation(
        self,
        outcome: CallOutcome,
        inner: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
        request: Any,
        context: grpc.aio.ServicerContext,
    ) -> None:
        """Runs the servicer of an admitted call with its `CallContext` current; a deferred
        call must have been authorized during it (by the domain call, through
        `call.authorize`), and a spent single-use permission is settled."""
        call = outcome.call
        assert call is not None
        try:
            self._ledger.ensure_writable()  # a known-broken ledger: refuse before acting
            token = _CURRENT.set(call)
            try:
                outcome.response = await inner(request, context)
            finally:
                _CURRENT.reset(token)
            if outcome.verdict is None and call.decision is None:
                raise PermissionDenied(f"{outcome.method} was not authorized; refused")
            await self._settle(outcome.verdict if outcome.verdict is not None else call.decision)
        except grpc.aio.AbortError as exc:
            # A servicer of gRPC's own (health: NOT_FOUND for an unknown service) answered
            # with `context.abort`: its status stands, it is no internal error.
            outcome.failed(exc)
            outcome.aborted = _aborted_status(context)
        except Exception as exc:  # mapped to a status when finishing; never re-raised to gRPC
            outcome.failed(exc)

    def _sampling(self, outcome: CallOutcome) -> tuple[bool, dict[str, Any] | None]:
        """Whether the event of `outcome` is written, and its `sampled` field: refusals by the
        rate limiter and unauthenticated calls on the attestation port are counted, and one
        event per caller (or peer address) and interval stands for all of them."""
        error = outcome.error
        if isinstance(error, RateLimited):
            metrics.record_refusal("rate_limit")
            key = f"rate:{outcome.seen.get('who', 'unauthenticated')}"
        elif isinstance(error, Unauthenticated) and "sample" in outcome.seen:
            metrics.record_refusal("unauthenticated")
            key = outcome.seen["sample"]
        else:
            return True, None
        previous = self._refusals.admit(key)
        if previous is None:
            return False, None
        return True, {
            "interval_seconds": self._refusals.interval,
            "previous_interval_refusals": previous,
        }

    async def _finish(
        self,
        outcome: CallOutcome,
        spec: MethodSpec | None,
        context: grpc.aio.ServicerContext,
        cancellation: _Cancellation,
        started: float,
    ) -> Any:
        """Samples refusals, writes the audit event (fail closed: a failed write fails the
        call), observes the metrics, then answers or aborts."""
        error = outcome.error
        if outcome.aborted is not None:
            code, message = outcome.aborted
        elif error is None:
            code, message = grpc.StatusCode.OK, ""
        else:
            code, message = to_status(error, outcome.correlation_id)
        recorded, sampled = self._sampling(outcome)
        if (spec is None or spec.audited) and recorded:
            event = audit_event(
                outcome,
                when=self._clock.now(),
                where=self._where(context),
                latency_ms=round((time.perf_counter() - started) * 1000, 3),
                status=code.name,
                message=message,
                sampled=sampled,
                cancelled=None if cancellation.outcome is None else cancellation.outcome.name,
            )
            try:
                if self._spans is not None:
                    with self._spans.step("audit.record"):
                        await self._ledger.record(event)
                else:
                    await self._ledger.record(event)
                if self._observer is not None:
                    extra = self._observer(event)
                    if extra is not None:
                        await self._ledger.record(extra)
            except AuditWriteFailed as exc:
                code, message = to_status(exc, outcome.correlation_id)
                error = exc
        outcome.status = code.name
        if cancellation.outcome is not None:
            metrics.observe_rpc(
                outcome.method, cancellation.outcome.name, time.perf_counter() - started
            )
            return None  # nobody is waiting for the answer
        metrics.observe_rpc(outcome.method, code.name, time.perf_counter() - started)
        if isinstance(error, grpc.aio.AbortError) and outcome.aborted is not None:
            raise error  # the servicer's own abort: gRPC sends the status it set
        if error is not None:
            await context.abort(code, message)
        return outcome.response


@dataclass
class CallOutcome:
    """What one unary call came to, as the pipeline saw it: the input of `audit_event`.

    `seen` holds what admission learnt before a refusal ("who", "resource", "rule", "flags",
    "serial", "minted_by", "sample"); `call` is set once the call was admitted; `verdict` is
    the pipeline's own policy decision (None for a deferred spec: `call.decision` is the
    servicer's); `refusal` is the message of an Unauthenticated or PermissionDenied raised at
    any step, which becomes the event's reason."""

    method: str
    action: str
    correlation_id: str
    justification: str
    seen: dict[str, Any] = field(default_factory=dict)
    call: CallContext | None = None
    verdict: Decision | None = None
    response: Any = None
    error: BaseException | None = None
    refusal: str = ""
    aborted: tuple[grpc.StatusCode, str] | None = None  # a servicer's own context.abort
    status: str = ""  # the gRPC status name the call ended with (set when finishing)

    def failed(self, exc: Exception) -> None:
        self.error = exc
        if isinstance(exc, Unauthenticated | PermissionDenied):
            self.refusal = str(exc)


def _finish_span(
    traced: RequestSpan, outcome: CallOutcome | None, cancellation: _Cancellation
) -> None:
    """The call's outcome on its span (see broker.tracing.server): status, caller, decision,
    and `secret.ref_sha256` from what the servicer recorded (`reference_sha256`, never the
    reference)."""
    if outcome is None:
        traced.finish("INTERNAL")
        return
    who, _resource, decision, _reason, _rule, _flags = _decision_of(outcome)
    call = outcome.call
    status = outcome.status or "UNKNOWN"
    if cancellation.outcome is not None:
        status = cancellation.outcome.name
    ref = call.details.get("reference_sha256", "") if call is not None else ""
    traced.finish(
        status,
        who=who,
        minted_by=outcome.seen.get("minted_by", ""),
        subject=call.caller.subject if call is not None else "",
        decision=decision,
        ref_sha256=ref if isinstance(ref, str) else "",
    )


def _decision_of(outcome: CallOutcome) -> tuple[str, str, str, str, str, Mapping[str, str]]:
    """(who, resource, decision, reason, rule, flags) of the event about `outcome`."""
    call = outcome.call
    if call is None:  # refused before the servicer: what admission had learnt
        seen = outcome.seen
        reason = outcome.refusal
        if not reason and isinstance(outcome.error, BrokerError):
            reason = str(outcome.error)  # e.g. the rate limit
        return (
            seen.get("who", "unauthenticated"),
            seen.get("resource", ""),
            "deny",
            reason,
            seen.get("rule", ""),
            seen.get("flags", {}),
        )
    decision, reason, rule = "allow", "", ""
    flags: Mapping[str, str] = {}
    verdict = outcome.verdict
    if verdict is not None:
        reason, rule, flags = verdict.reason, verdict.rule, verdict.flags
    if outcome.refusal:
        reason = outcome.refusal
    if call.policy is not None:  # a deferred decision: the servicer's
        if call.decision is None:
            decision = "deny"
        else:
            decision = "allow" if call.decision.allowed else "deny"
            reason, rule, flags = call.decision.reason, call.decision.rule, call.decision.flags
    return call.caller.spiffe_id, call.resource, decision, reason, rule, flags


def audit_event(
    outcome: CallOutcome,
    *,
    when: dt.datetime,
    where: str,
    latency_ms: float,
    status: str,
    message: str,
    sampled: Mapping[str, Any] | None = None,
    cancelled: str | None = None,
) -> AuditEvent:
    """The audit event of one call (pure). `status` and `message` are what the client is
    told (`message` is recorded as the error when the call failed); `sampled` stands for the
    refusals of one caller in an interval; `cancelled` is the status of a call whose client
    went away, and `effect` then says whether its change took effect."""
    who, resource, decision, reason, rule, flags = _decision_of(outcome)
    error = outcome.error
    effect = None
    if cancelled is not None:
        if error is None:
            effect = "applied"
        elif isinstance(error, BrokerError | ca_errors.CAError):
            effect = "none"
        else:
            effect = "unknown"
    call = outcome.call
    return AuditEvent(
        when=when,
        who=who,
        what=outcome.action or outcome.method,
        method=outcome.method,
        resource=resource,
        where=where,
        why=outcome.justification,
        correlation_id=outcome.correlation_id,
        decision=decision,
        reason=reason,
        rule=rule,
        outcome=cancelled or status,
        latency_ms=latency_ms,
        error=message if error is not None else None,
        serial=outcome.seen.get("serial"),
        sampled=sampled,
        effect=effect,
        details=call.details if call is not None and call.details else None,
        flags=dict(flags) if flags else None,
        minted_by=outcome.seen.get("minted_by") or None,
    )
