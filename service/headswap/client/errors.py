"""Typed errors for the Python client: one class per gRPC status, each carrying the status and the
server's message, so that callers catch `NotFoundError` instead of comparing status codes.
"""

from __future__ import annotations

import grpc


class ClientError(Exception):
    """A call to the headswap server failed. `code` is the gRPC status, `details` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class CancelledError(ClientError):
    code = grpc.StatusCode.CANCELLED


class UnknownError(ClientError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(ClientError):
    """The request was refused as malformed: a bad image, label, name or configuration value."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(ClientError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(ClientError):
    """No such model, version or job (or a job that belongs to another caller)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(ClientError):
    """A model of that name exists already, or a job for it is still running."""

    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(ClientError):
    """The credential is valid but lacks the scope the call needs."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(ClientError):
    """A server limit was reached (images, bytes, queued jobs, concurrent calls): retry later or send less."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(ClientError):
    """The call is valid but not in the current state (e.g. cancelling a finished job)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(ClientError):
    code = grpc.StatusCode.ABORTED


class OutOfRangeError(ClientError):
    code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(ClientError):
    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(ClientError):
    code = grpc.StatusCode.INTERNAL


class UnavailableError(ClientError):
    """The server cannot be reached, is not ready, or is shutting down: usually worth a retry."""

    code = grpc.StatusCode.UNAVAILABLE


class DataLossError(ClientError):
    code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(ClientError):
    """No credential, or one the server does not know (a wrong or revoked token)."""

    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[ClientError]] = {
    cls.code: cls for cls in (CancelledError, UnknownError, InvalidArgumentError, DeadlineExceededError,
                              NotFoundError, AlreadyExistsError, PermissionDeniedError, ResourceExhaustedError,
                              FailedPreconditionError, AbortedError, OutOfRangeError, UnimplementedError,
                              InternalError, UnavailableError, DataLossError, UnauthenticatedError)}


def from_rpc_error(err: grpc.RpcError) -> ClientError:
    """The typed error for a failed call (grpc raises RpcError objects that are also calls)."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    return _BY_CODE.get(code, ClientError)(details or "", code or grpc.StatusCode.UNKNOWN)
