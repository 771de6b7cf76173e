"""Domain errors. The transport maps each one to a gRPC status; the domain never imports gRPC."""


def shown_name(text: str) -> str:
    """A caller's text as quoted in a message: repr (control characters escaped), cut short,
    because a name or field may be megabytes and status details travel as metadata."""
    return repr(text) if len(text) <= 80 else f"{text[:80]!r}... ({len(text)} characters)"


class HeadswapError(Exception):
    """Base class: the message is written for the person who made the call."""


class InvalidInput(HeadswapError):
    """The caller sent something that cannot be used (INVALID_ARGUMENT)."""


class NotFound(HeadswapError):
    """A model, version or job that does not exist (NOT_FOUND)."""


class AlreadyExists(HeadswapError):
    """A name that is already taken (ALREADY_EXISTS)."""


class ResourceExhausted(HeadswapError):
    """Too large, too many, or a full queue (RESOURCE_EXHAUSTED)."""


class FailedPrecondition(HeadswapError):
    """The request is valid but the system is not in a state to do it (FAILED_PRECONDITION)."""


class Unavailable(HeadswapError):
    """Not ready yet or shutting down; retry later (UNAVAILABLE)."""


class StoreUnavailable(Unavailable):
    """The model store failed or did not answer within --store-timeout-s (UNAVAILABLE, naming it)."""


class StoreOutcomeUnknown(StoreUnavailable):
    """A store write was sent but never confirmed: it may still apply; the caller must check."""


class DeadlineExceeded(HeadswapError):
    """The request's deadline passed before it could run (DEADLINE_EXCEEDED)."""


class CorruptModel(HeadswapError):
    """A stored version that fails its checks (bad sha256, unreadable ONNX, missing manifest)."""


class Cancelled(HeadswapError):
    """The caller cancelled the call or went away; its work was stopped (CANCELLED)."""
