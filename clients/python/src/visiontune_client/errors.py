"""Every exception the SDK raises derives from `VisionTuneError`."""

from typing import Any


class VisionTuneError(Exception):
    """Base class of the SDK's exceptions."""


class MissingAPIKeyError(VisionTuneError):
    """No API key was given and `VISIONTUNE_API_KEY` is not set."""


class InvalidDatasetError(VisionTuneError, ValueError):
    """A folder to upload is not an ImageFolder; found before anything is sent."""


class WaitTimeoutError(VisionTuneError, TimeoutError):
    """A `wait` ran past its `timeout`; the work goes on on the server."""


class APIConnectionError(VisionTuneError):
    """The server could not be reached, or the connection broke."""

    def __init__(self, message: str, url: str | None = None):
        super().__init__(message)
        self.url = url


class APITimeoutError(APIConnectionError):
    """The server accepted the connection but did not answer in time."""


class APIError(VisionTuneError):
    """The server answered with an error status and its `{"error": {...}}` envelope."""

    def __init__(self, status_code: int, code: str, message: str, details: list[Any], request_id: str | None):
        super().__init__(f"{status_code} {code}: {message}")
        self.status_code = status_code
        self.code = code
        self.message = message
        self.details = details
        self.request_id = request_id


class AuthenticationError(APIError):
    """401: missing, unknown or revoked API key."""


class PermissionDeniedError(APIError):
    """403: the key lacks the scope the endpoint needs."""


class NotFoundError(APIError):
    """404: no such object (or not this tenant's)."""


class ConflictError(APIError):
    """409: the object's state does not allow this (e.g. pausing a finished job)."""


class ValidationError(APIError):
    """400, 413, 415, 422: the request or its content was refused."""


class RateLimitError(APIError):
    """429: a tenant quota would be exceeded."""


class ServiceUnavailableError(APIError):
    """503: a server dependency (database, broker, storage) is unavailable."""


class OperationFailedError(VisionTuneError):
    """Work the SDK waited for ended without success; `resource` is its final state."""

    def __init__(self, what: str, code: str, message: str, resource: Any):
        super().__init__(f"{what}: {code}: {message}")
        self.code = code
        self.message = message
        self.resource = resource


class JobFailedError(OperationFailedError):
    """The job ended `failed`."""


class JobCancelledError(OperationFailedError):
    """The job ended `cancelled`."""


class DatasetFailedError(OperationFailedError):
    """The uploaded dataset was refused while it was processed."""


class ExportFailedError(OperationFailedError):
    """The model export failed (its parity check, or the conversion)."""


class AuditFailedError(OperationFailedError):
    """The dataset audit failed."""


STATUS_ERRORS: dict[int, type[APIError]] = {
    400: ValidationError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: ValidationError,
    415: ValidationError,
    422: ValidationError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}
