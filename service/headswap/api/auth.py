"""Authentication, scopes and the audit trail: one server interceptor and one method -> scope table.

Every call passes through `AuthInterceptor`: it finds the caller (a bearer token in the
`authorization` metadata, or a mutual-TLS client certificate mapped in the credentials file),
checks the scope the method needs (`METHOD_SCOPES`; a method missing from the table needs admin),
and makes the caller available to servicers through `caller()`, so the domain receives a name,
never a token. Model-changing and training calls, and every refused call, leave one line on the
`headswap.audit` logger.
"""

from __future__ import annotations

import contextvars
import logging
import re
from typing import Any, Callable, Iterator

import grpc

from headswap.api.arrival import client_address
from headswap.api.status import count_refused
from headswap.errors import InvalidInput, shown_name
from headswap.security.credentials import ADMIN, ANONYMOUS_SCOPES, CLASSIFY, TRAIN, CredentialStore, Principal

audit_log = logging.getLogger("headswap.audit")
# Model names and job ids as the registry and job store make them; anything else is quoted.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

OPEN = "open"  # no credential needed: health checks for probes and load balancers

_V1, _KSERVE = "/headswap.v1.", "/inference.GRPCInferenceService/"
METHOD_SCOPES: dict[str, str] = {
    f"{_V1}Inference/Classify": CLASSIFY,
    f"{_V1}Inference/RankForLabelling": CLASSIFY,
    f"{_V1}Models/ListModels": CLASSIFY,
    f"{_V1}Models/GetModel": CLASSIFY,
    f"{_V1}Models/ActivateModel": ADMIN,
    f"{_V1}Models/RollbackModel": ADMIN,
    f"{_V1}Models/StartRollout": ADMIN,
    f"{_V1}Models/GetRollout": ADMIN,
    f"{_V1}Models/PromoteRollout": ADMIN,
    f"{_V1}Models/AbortRollout": ADMIN,
    # train: the servicer limits a train-only caller to its own jobs; admin sees every job.
    f"{_V1}Training/FineTune": TRAIN,
    f"{_V1}Training/WatchJob": TRAIN,
    f"{_V1}Training/GetJob": TRAIN,
    f"{_V1}Training/ListJobs": TRAIN,
    f"{_V1}Training/CancelJob": TRAIN,
    f"{_KSERVE}ServerLive": CLASSIFY,
    f"{_KSERVE}ServerReady": CLASSIFY,
    f"{_KSERVE}ServerMetadata": CLASSIFY,
    f"{_KSERVE}ModelReady": CLASSIFY,
    f"{_KSERVE}ModelMetadata": CLASSIFY,
    f"{_KSERVE}ModelConfig": CLASSIFY,
    f"{_KSERVE}ModelStatistics": CLASSIFY,
    f"{_KSERVE}ModelInfer": CLASSIFY,
    f"{_KSERVE}RepositoryIndex": CLASSIFY,
    f"{_KSERVE}RepositoryModelLoad": ADMIN,
    f"{_KSERVE}RepositoryModelUnload": ADMIN,
    # Reflection describes the API (not data); anyone who may call it may see it.
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": CLASSIFY,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": CLASSIFY,
    "/grpc.health.v1.Health/Check": OPEN,
    "/grpc.health.v1.Health/Watch": OPEN,
    "/grpc.health.v1.Health/List": OPEN,
}

# Calls that change what is served or start/stop training: audited whatever their outcome.
AUDITED = frozenset({f"{_V1}Models/ActivateModel", f"{_V1}Models/RollbackModel", f"{_V1}Models/StartRollout",
                     f"{_V1}Models/PromoteRollout", f"{_V1}Models/AbortRollout", f"{_V1}Training/FineTune",
                     f"{_V1}Training/CancelJob", f"{_KSERVE}RepositoryModelLoad",
                     f"{_KSERVE}RepositoryModelUnload"})


def scope_for(method: str) -> str:
    """The scope a full method name needs; unknown methods need admin (deny by default)."""
    return METHOD_SCOPES.get(method, ADMIN)


_ANONYMOUS = Principal("anonymous", ANONYMOUS_SCOPES, "none")
_CALLER: contextvars.ContextVar[Principal] = contextvars.ContextVar("headswap_caller", default=_ANONYMOUS)


def caller() -> Principal:
    """Who makes the current call (set by the interceptor before the servicer runs)."""
    return _CALLER.get()


def caller_key(context: grpc.ServicerContext) -> str:
    """Who the current caller is, for per-caller bounds: its credential when it presented one,
    else its client address (every caller behind one proxy shares that)."""
    return key_of(caller(), client_address(context.peer()))


def key_of(principal: Principal, address: str) -> str:
    """The per-caller key of a principal calling from `address` (gRPC's and REST's calls share it)."""
    if principal.via != "none":
        return f"{principal.via}:{principal.name}"
    return address


ROUTING_KEY = "routing-key"  # metadata entry / HTTP header naming the end user a rollout's split sticks to
MAX_ROUTING_KEY_LENGTH = 256  # it is only hashed; a longer one is a caller's mistake, refused


def routing_key(context: grpc.ServicerContext) -> str | None:
    """The gRPC call's routing key (see `routing_key_of`)."""
    sent = next((str(value) for key, value in context.invocation_metadata() or () if key == ROUTING_KEY), None)
    return routing_key_of(sent, caller())


def routing_key_of(sent: str | None, principal: Principal) -> str | None:
    """What a rollout's sticky split keys on (headswap.inference.rollout): the `routing-key` the caller
    sent, else its credential's name; None (routed by weight) without either. Only hashed, never stored."""
    if sent:
        if len(sent) > MAX_ROUTING_KEY_LENGTH:
            raise InvalidInput(f"the {ROUTING_KEY} metadata has {len(sent)} characters; at most "
                               f"{MAX_ROUTING_KEY_LENGTH} are accepted (it names one end user)")
        return sent
    return principal.name if principal.via != "none" else None


def job_owner() -> str | None:
    """The owner whose jobs the current caller may see: None means every job (admin)."""
    principal = caller()
    return None if principal.sees_all_jobs else principal.name


class Denied(Exception):
    """A caller refused: the gRPC status and the message it gets."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticate, authorize and audit every call. `store` None: authentication is off.

    With authentication off every caller may do everything (local development, as before access
    control existed); calls are still audited, under the client certificate's name when there is one.
    """

    def __init__(self, store: CredentialStore | None, mutual_tls: bool) -> None:
        self.store = store
        self.mutual_tls = mutual_tls

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        scope = scope_for(method)
        metadata = handler_call_details.invocation_metadata or ()
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(handler.stream_stream, method, scope, metadata),
                handler.request_deserializer, handler.response_serializer)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, method, scope, metadata, stream_in=True),
                handler.request_deserializer, handler.response_serializer)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, method, scope, metadata),
                handler.request_deserializer, handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(
            self._unary(handler.unary_unary, method, scope, metadata, stream_in=False),
            handler.request_deserializer, handler.response_serializer)

    # --- wrappers ----------------------------------------------------------------------------

    def _unary(self, behaviour: Callable, method: str, scope: str, metadata, stream_in: bool) -> Callable:
        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            principal = self._admit(method, scope, metadata, context)
            if method not in AUDITED:
                return behaviour(request, context)
            seen: dict[str, Any] = {}
            if stream_in:
                request = _first_config(request, seen)
            else:
                seen["request"] = request
            response = None
            try:
                response = behaviour(request, context)
                return response
            finally:
                _audit(principal, method, _code(context, response), seen.get("request"), response)

        return handle

    def _streaming(self, behaviour: Callable, method: str, scope: str, metadata) -> Callable:
        def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            self._admit(method, scope, metadata, context)
            yield from behaviour(request, context)

        return handle

    def _admit(self, method: str, scope: str, metadata, context: grpc.ServicerContext) -> Principal:
        """The caller, or abort the call with UNAUTHENTICATED / PERMISSION_DENIED."""
        header = next((str(value) for key, value in metadata if key == "authorization"), None)
        identities = _certificate_identities(context) if self.mutual_tls and scope != OPEN else []
        try:
            principal = admit(self.store, self.mutual_tls, method, scope, header, identities)
        except Denied as denied:
            context.abort(denied.code, denied.message)
        _CALLER.set(principal)  # no reset: every call sets its own caller before its servicer runs
        return principal


def admit(store: CredentialStore | None, mutual_tls: bool, method: str, scope: str, header: str | None,
          identities: list[str], protocol: str = "grpc") -> Principal:
    """The caller of `method` (which needs `scope`), from its authorization header value and verified
    client-certificate names; Denied (counted and audited) when it may not call it. gRPC and REST
    both come here: one set of rules for who may do what."""
    try:
        principal = _ANONYMOUS if scope == OPEN else authenticate(store, mutual_tls, header, identities)
        if scope != OPEN and not principal.allows(scope):
            raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                         f"{principal.name!r} may not call {method.rsplit('/', 1)[-1]}: it needs the "
                         f"'{scope}' scope and has {', '.join(sorted(principal.scopes))}")
    except Denied as denied:
        count_refused(method, denied.code, protocol)
        _audit(None if denied.code == grpc.StatusCode.UNAUTHENTICATED else principal, method, denied.code,
               None, None, reason=denied.message, protocol=protocol)
        raise
    return principal


def authenticate(store: CredentialStore | None, mutual_tls: bool, header: str | None,
                 identities: list[str]) -> Principal:
    """A bearer token if the call has one, else a mapped client certificate; else UNAUTHENTICATED."""
    if store is None:
        return Principal(identities[0], ANONYMOUS_SCOPES, "certificate") if identities else _ANONYMOUS
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Denied(grpc.StatusCode.UNAUTHENTICATED,
                         "the authorization metadata must be 'Bearer <token>'")
        principal = store.by_token(token.strip())
        if principal is None:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED,
                         "unknown bearer token: it matches no entry of the server's credentials file")
        return principal
    if identities:
        principal = store.by_identity(identities)
        if principal is None:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED,
                         f"client certificate {identities[0]!r} is not mapped to scopes in the server's "
                         "credentials file (client_identity); send a bearer token instead")
        return principal
    raise Denied(grpc.StatusCode.UNAUTHENTICATED,
                 "this server needs a credential: send the metadata 'authorization: Bearer <token>'"
                 + (" or a client certificate named in its credentials file" if mutual_tls else ""))


def _certificate_identities(context: grpc.ServicerContext) -> list[str]:
    """The verified client certificate's SANs, then its CN (empty without mutual TLS)."""
    auth = context.auth_context() or {}
    names = [*auth.get("x509_subject_alternative_name", ()), *auth.get("x509_common_name", ())]
    return [n.decode(errors="replace") if isinstance(n, bytes) else str(n) for n in names]


def _first_config(requests: Iterator[Any], seen: dict[str, Any]) -> Iterator[Any]:
    """Pass a request stream through, remembering its first message (FineTune's config) for the audit."""
    for request in requests:
        seen.setdefault("request", request)
        yield request


def _code(context: grpc.ServicerContext, response: Any) -> grpc.StatusCode:
    if response is not None:
        return grpc.StatusCode.OK
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _audit(principal: Principal | None, method: str, code: grpc.StatusCode, request: Any, response: Any,
           reason: str = "", protocol: str = "grpc") -> None:
    """One line: who, what, on which model/version or job, with what result. Never a credential."""
    fields = {"who": principal.name if principal else "unauthenticated",
              "via": principal.via if principal else "none",
              "method": method.rsplit("/", 1)[-1], "service": method.strip("/").split("/")[0],
              "result": code.name}
    config = request.config if request is not None and "config" in _field_names(request) else None
    for source in (request, config, response):
        if source is None:
            continue
        for key, attrs in (("model", ("name", "model_name", "model")), ("version", ("version", "active_version")),
                           ("job_id", ("job_id",))):
            if not fields.get(key):
                value = next((getattr(source, a) for a in attrs if a in _field_names(source)), None)
                if value not in (None, "", 0):
                    fields[key] = _plain(value)
    if protocol != "grpc":
        fields["protocol"] = protocol
    if reason:
        fields["reason"] = reason
    extra: dict[str, Any] = dict(fields)
    if code != grpc.StatusCode.OK:  # refusals are what a caller can send at will: throttled (headswap.logs)
        extra["throttle"] = f"audit {fields['who']} {fields['method']} {fields['result']}"
    audit_log.info("audit %s", " ".join(f"{k}={v!r}" if k == "reason" else f"{k}={v}" for k, v in fields.items()),
                   extra=extra)


def _plain(value: Any) -> Any:
    """A caller-chosen name as it may appear in an audit line: as it is when plain, else quoted and
    cut, so that a name holding a newline cannot forge a line of its own or fill the log."""
    if isinstance(value, str) and not _PLAIN_NAME.fullmatch(value):
        return shown_name(value)
    return value


def _field_names(message: Any) -> set[str]:
    descriptor = getattr(message, "DESCRIPTOR", None)
    return {f.name for f in descriptor.fields} if descriptor is not None and hasattr(descriptor, "fields") else set()
