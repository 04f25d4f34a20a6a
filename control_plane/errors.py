"""The control plane's errors, each rendered as {"error": ..., "code": ...} by one handler.

Exception tree::

    MlcpError
    ├── BadRequest (400)
    ├── Unauthorized (401)
    ├── Forbidden (403)
    ├── NotFound (404)
    ├── MethodNotAllowed (405)
    ├── Conflict (409)
    ├── PayloadTooLarge (413)
    ├── UnsupportedMediaType (415)
    ├── Invalid (422)
    ├── TooManyRequests (429)
    ├── InternalError (500, only for bugs; the message never echoes the cause)
    ├── BadGateway (502)
    ├── ServiceUnavailable (503, with Retry-After)
    └── GatewayTimeout (504)
"""

from __future__ import annotations

from typing import ClassVar


class MlcpError(Exception):
    """Something went wrong."""

    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        self.message = message or (type(self).__doc__ or "error").strip()
        self.error_code = code or self.code
        self.retry_after_s = retry_after_s
        super().__init__(self.message)

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, int(self.retry_after_s)))}


class BadRequest(MlcpError):
    """The request body is not valid JSON."""

    status_code = 400
    code = "invalid_json"


class Unauthorized(MlcpError):
    """A valid API key is required: send 'Authorization: Key <key>'."""

    status_code = 401
    code = "unauthorized"


class Forbidden(MlcpError):
    """This key may not do that."""

    status_code = 403
    code = "forbidden"


class NotFound(MlcpError):
    """Not found."""

    status_code = 404
    code = "not_found"


class MethodNotAllowed(MlcpError):
    """Method not allowed."""

    status_code = 405
    code = "method_not_allowed"


class Conflict(MlcpError):
    """The request conflicts with the current state."""

    status_code = 409
    code = "conflict"


class PayloadTooLarge(MlcpError):
    """The request body is too large."""

    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(MlcpError):
    """Send the body as JSON (Content-Type: application/json)."""

    status_code = 415
    code = "unsupported_media_type"


class Invalid(MlcpError):
    """The request is invalid."""

    status_code = 422
    code = "invalid_request"


class TooManyRequests(MlcpError):
    """Too many requests."""

    status_code = 429
    code = "rate_limited"


class InternalError(MlcpError):
    """Internal error."""

    status_code = 500
    code = "internal_error"


class BadGateway(MlcpError):
    """The model instance failed."""

    status_code = 502
    code = "instance_failed"


class ServiceUnavailable(MlcpError):
    """The service is unavailable; try again later."""

    status_code = 503
    code = "unavailable"


class GatewayTimeout(MlcpError):
    """The model instance did not answer in time."""

    status_code = 504
    code = "instance_timeout"
