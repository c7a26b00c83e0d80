"""One error family for the whole service, rendered as one JSON envelope by app.main."""

from typing import Any

from pydantic import BaseModel


class ErrorBody(BaseModel):
    """What went wrong: in every error response, and on a dataset or export that failed."""

    code: str
    message: str
    details: list[Any]


class AppError(Exception):
    status_code = 400
    code = "bad_request"
    headers: dict[str, str] | None = None

    def __init__(self, message: str, *, code: str | None = None, details: list[Any] | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.details = details or []

    def as_dict(self) -> dict[str, Any]:
        """The envelope's content, as it is also stored on work that failed in a worker."""
        return {"code": self.code, "message": self.message, "details": self.details}


class NotFound(AppError):
    status_code = 404
    code = "not_found"


class Conflict(AppError):
    status_code = 409
    code = "conflict"


class Invalid(AppError):
    """Well-formed request whose content cannot be used (422)."""

    status_code = 422
    code = "invalid"


class TooLarge(AppError):
    status_code = 413
    code = "too_large"


class UnsupportedMedia(AppError):
    status_code = 415
    code = "unsupported_media_type"


class InsufficientStorage(AppError):
    status_code = 507
    code = "insufficient_storage"


class DeadlineExceeded(AppError):
    """The server gave up on its own deadline (a prediction that could not be answered in time)."""

    status_code = 504
    code = "deadline_exceeded"


class Unauthorized(AppError):
    status_code = 401
    code = "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(AppError):
    """An authenticated key without the scope an endpoint needs. Never used for another tenant's
    objects: those are NotFound, so that ids of other tenants cannot be probed."""

    status_code = 403
    code = "insufficient_scope"


class QuotaExceeded(AppError):
    status_code = 429
    code = "quota_exceeded"


class RequestTimeout(AppError):
    status_code = 408
    code = "request_timeout"
