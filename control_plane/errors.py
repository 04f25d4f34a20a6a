"""Every error the control plane answers with, by meaning; one handler renders the envelope.

Each class fixes its HTTP status and its stable `code`; its docstring is the default message.
Routes raise these and nothing else reaches a client: foreign errors (the agent's, asyncpg's,
aiohttp's) are translated where they are caught. Code that needs to react to an error tests it
with `isinstance`, never by comparing code strings. README.md lists every code with its status.

Exception tree::

    MlcpError (500 internal_error: only for bugs; the message never echoes the cause)
    ├── BadRequest (400)
    │   ├── InvalidJson (400 invalid_json)
    │   ├── InvalidHeader (400 invalid_header)
    │   ├── HttpProtocolError (400 http_error)
    │   ├── InvalidLastEventId (400 invalid_last_event_id)
    │   └── InvalidQuery (400 invalid_query)
    ├── Unauthorized (401 unauthorized)
    ├── Forbidden (403 forbidden)
    │   ├── InvalidSignature (403 invalid_signature)
    │   └── UploadExpired (403 upload_expired)
    ├── NotFound (404)
    │   ├── RouteNotFound (404 not_found)
    │   ├── ModelNotFound (404 model_not_found)
    │   ├── NotLoaded (404 not_loaded)
    │   ├── KeyNotFound (404 key_not_found)
    │   ├── RequestNotFound (404 request_not_found)
    │   ├── UploadNotFound (404 upload_not_found)
    │   └── ApiNotFound (404 api_not_found)
    ├── MethodNotAllowed (405 method_not_allowed)
    ├── Conflict (409)
    │   ├── NotBenchmarked (409 not_benchmarked)
    │   ├── BenchmarkFailed (409 benchmark_failed)
    │   ├── InstanceStopping (409 instance_stopping, Retry-After)
    │   ├── LastAdminKey (409 last_admin_key)
    │   ├── RequestFinished (409 request_finished)
    │   ├── UploadComplete (409 upload_complete)
    │   ├── UploadInProgress (409 upload_in_progress)
    │   ├── UploadIncomplete (409 upload_incomplete)
    │   ├── ApiNotReady (409 api_not_ready)
    │   ├── GrpcServiceTaken (409 grpc_service_taken)
    │   ├── ApiNameTaken (409 api_name_taken)
    │   └── EngineInUse (409 engine_in_use)
    ├── PayloadTooLarge (413 payload_too_large)
    ├── UnsupportedMediaType (415 unsupported_media_type)
    ├── Invalid (422 invalid_request)
    │   ├── InvalidBody (422 invalid_body)
    │   ├── UnknownField (422 unknown_field)
    │   ├── InvalidField (422 invalid_field)
    │   ├── InvalidModelId (422 invalid_model)
    │   ├── InvalidPrompt (422 invalid_prompt)
    │   ├── InvalidParams (422 invalid_params)
    │   ├── InvalidUnicode (422 invalid_unicode)
    │   ├── InvalidWebhook (422 invalid_webhook)
    │   ├── UnsupportedTask (422 unsupported_task)
    │   ├── InsufficientMemory (422 insufficient_memory)
    │   ├── NoGpu (422 no_gpu)
    │   ├── EngineUnavailable (422 engine_unavailable)
    │   ├── InvalidApiName (422 invalid_api_name)
    │   ├── InvalidProject (422 invalid_project)
    │   ├── InvalidProjectSpec (422 invalid_spec)
    │   ├── InvalidRequirements (422 invalid_requirements)
    │   ├── MissingBlob (422 missing_blob)
    │   └── BlobHashMismatch (422 blob_hash_mismatch)
    ├── TooManyRequests (429 too_many_requests, Retry-After)
    │   ├── QuotaExceeded (429 quota_exceeded, Retry-After, RateLimit-*)
    │   ├── RateLimited (429 rate_limited, Retry-After, RateLimit-*)
    │   ├── TooManyStreams (429 too_many_streams, Retry-After, RateLimit-*)
    │   ├── InstanceLimit (429 instance_limit, Retry-After, RateLimit-*)
    │   └── ApiLimit (429 api_limit, Retry-After, RateLimit-*)
    ├── InstanceError (502)
    │   ├── InstanceFailed (502 instance_failed)
    │   ├── InvalidAnswer (502 instance_error)
    │   ├── HandlerError (502 handler_error)
    │   └── HandlerBadOutput (502 handler_bad_output)
    ├── Unavailable (503, always with Retry-After)
    │   ├── CapacityFull (503 capacity_full)
    │   ├── Loading (503 loading)
    │   ├── InstanceBusy (503 instance_busy)
    │   ├── StateChanging (503 state_changing)
    │   ├── GenerationFailed (503 generation_failed)
    │   ├── RuntimeFailed (503 runtime_failed)
    │   │   └── ClusterUnavailable (503 cluster_unavailable)
    │   └── DatabaseUnavailable (503 database_unavailable)
    └── InstanceTimeout (504 instance_timeout)
        └── HandlerTimeout (504 handler_timeout)
"""

from __future__ import annotations

from typing import ClassVar


class MlcpError(Exception):
    """Internal error."""

    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    # Seconds a client should wait before retrying, sent as Retry-After; None sends none.
    default_retry_after_s: ClassVar[int | None] = None

    def __init__(self, message: str | None = None, *, retry_after_s: int | None = None) -> None:
        self.message = message or (type(self).__doc__ or "error").strip()
        self.retry_after_s = (
            retry_after_s if retry_after_s is not None else (self.default_retry_after_s)
        )
        super().__init__(self.message)

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, int(self.retry_after_s)))}


# -- 400 -------------------------------------------------------------------------------------


class BadRequest(MlcpError):
    """The request could not be read."""

    status_code = 400
    code = "invalid_json"


class InvalidJson(BadRequest):
    """The request body is not valid JSON."""

    code = "invalid_json"


class InvalidHeader(BadRequest):
    """A request header is invalid."""

    code = "invalid_header"


class HttpProtocolError(BadRequest):
    """The request does not follow HTTP."""

    code = "http_error"


class InvalidLastEventId(BadRequest):
    """Last-Event-ID must be the id of an event (a non-negative integer)."""

    code = "invalid_last_event_id"


class InvalidQuery(BadRequest):
    """A query parameter has an invalid value."""

    code = "invalid_query"


# -- 401, 403 --------------------------------------------------------------------------------


class Unauthorized(MlcpError):
    """A valid API key is required: send 'Authorization: Key <key>'."""

    status_code = 401
    code = "unauthorized"


class Forbidden(MlcpError):
    """This key may not do that."""

    status_code = 403
    code = "forbidden"


class InvalidSignature(Forbidden):
    """The upload URL is not one mlcp signed (tampered with, or for another slot)."""

    code = "invalid_signature"


class UploadExpired(Forbidden):
    """The upload URL has expired; ask for a new one."""

    code = "upload_expired"


# -- 404, 405 --------------------------------------------------------------------------------


class NotFound(MlcpError):
    """Not found."""

    status_code = 404
    code = "not_found"


class RouteNotFound(NotFound):
    """No such route."""

    code = "not_found"


class ModelNotFound(NotFound):
    """The model is not in the catalog."""

    code = "model_not_found"


class NotLoaded(NotFound):
    """The model is not loaded: POST /model/load first."""

    code = "not_loaded"


class KeyNotFound(NotFound):
    """No such key."""

    code = "key_not_found"


class RequestNotFound(NotFound):
    """No such async request."""

    code = "request_not_found"


class UploadNotFound(NotFound):
    """No such upload."""

    code = "upload_not_found"


class MethodNotAllowed(MlcpError):
    """Method not allowed."""

    status_code = 405
    code = "method_not_allowed"


# -- 409 -------------------------------------------------------------------------------------


class Conflict(MlcpError):
    """The request conflicts with the current state."""

    status_code = 409
    code = "conflict"


class NotBenchmarked(Conflict):
    """The model has not been benchmarked yet: request it with POST /model/job."""

    code = "not_benchmarked"


class BenchmarkFailed(Conflict):
    """The model cannot be benchmarked."""

    code = "benchmark_failed"


class InstanceStopping(Conflict):
    """The model's instance is stopping; load it again in a moment."""

    code = "instance_stopping"
    default_retry_after_s = 2


class LastAdminKey(Conflict):
    """This is the last active admin key: create another admin key before revoking it."""

    code = "last_admin_key"


class RequestFinished(Conflict):
    """The async request has already finished."""

    code = "request_finished"


class UploadComplete(Conflict):
    """This upload is complete already; ask for a new upload URL to send another file."""

    code = "upload_complete"


class UploadInProgress(Conflict):
    """This upload is being written by another request."""

    code = "upload_in_progress"


class UploadIncomplete(Conflict):
    """The upload has not been completed: PUT the file to its URL first."""

    code = "upload_incomplete"


# -- 413, 415 --------------------------------------------------------------------------------


class PayloadTooLarge(MlcpError):
    """The request body is too large."""

    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(MlcpError):
    """Send the body as JSON (Content-Type: application/json)."""

    status_code = 415
    code = "unsupported_media_type"


# -- 422 -------------------------------------------------------------------------------------


class Invalid(MlcpError):
    """The request is invalid."""

    status_code = 422
    code = "invalid_request"


class InvalidBody(Invalid):
    """The request body must be a JSON object."""

    code = "invalid_body"


class UnknownField(Invalid):
    """The request has a field this route does not take."""

    code = "unknown_field"


class InvalidField(Invalid):
    """A field has an invalid value."""

    code = "invalid_field"


class InvalidModelId(Invalid):
    """'model' must be a model id like 'org/name'."""

    code = "invalid_model"


class InvalidPrompt(Invalid):
    """The prompt is invalid."""

    code = "invalid_prompt"


class InvalidParams(Invalid):
    """The generation parameters are invalid."""

    code = "invalid_params"


class InvalidUnicode(Invalid):
    """Strings must be valid Unicode (no lone surrogates)."""

    code = "invalid_unicode"


class InvalidWebhook(Invalid):
    """The webhook URL is invalid or its host is not allowed (MLCP_WEBHOOK_ALLOW)."""

    code = "invalid_webhook"


class UnsupportedTask(Invalid):
    """The model's task cannot be served by this route."""

    code = "unsupported_task"


class InsufficientMemory(Invalid):
    """The model can never fit on this host."""

    code = "insufficient_memory"


class NoGpu(Invalid):
    """This host has no GPU to place on: load with "device": "cpu" or "auto"."""

    code = "no_gpu"


class EngineUnavailable(Invalid):
    """The engine asked for cannot serve this model here (llama.cpp serves GGUF files only)."""

    code = "engine_unavailable"


class EngineInUse(Conflict):
    """The model's live instance runs another engine: unload it before loading with this one."""

    code = "engine_in_use"


# -- 502, 504 --------------------------------------------------------------------------------


class InstanceError(MlcpError):
    """The model instance failed."""

    status_code = 502
    code = "instance_failed"


class InstanceFailed(InstanceError):
    """The model instance failed while serving the request."""

    code = "instance_failed"


class InvalidAnswer(InstanceError):
    """The model instance sent an invalid answer."""

    code = "instance_error"


class TooManyRequests(MlcpError):
    """This key has too many async requests queued; retry later."""

    status_code = 429
    code = "too_many_requests"
    default_retry_after_s = 5

    def __init__(
        self,
        message: str | None = None,
        *,
        retry_after_s: int | None = None,
        rate_limit: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        # The RateLimit-* headers of the limit that refused (control_plane/limits.py).
        self.rate_limit = rate_limit or {}

    def headers(self) -> dict[str, str]:
        return {**super().headers(), **self.rate_limit}


class QuotaExceeded(TooManyRequests):
    """This key has used all of its calls for this month."""

    code = "quota_exceeded"


class RateLimited(TooManyRequests):
    """This key has sent more requests in the last minute than it may."""

    code = "rate_limited"


class TooManyStreams(TooManyRequests):
    """This key has as many streams open as it may; finish one first."""

    code = "too_many_streams"
    default_retry_after_s = 1


class InstanceLimit(TooManyRequests):
    """This key has as many instances loaded as it may; delete one first."""

    code = "instance_limit"


class ApiLimit(TooManyRequests):
    """This key owns as many APIs as it may; delete one first."""

    code = "api_limit"


class InstanceTimeout(MlcpError):
    """The model instance did not answer in time."""

    status_code = 504
    code = "instance_timeout"


# -- 503 -------------------------------------------------------------------------------------


class Unavailable(MlcpError):
    """The service is unavailable; try again later."""

    status_code = 503
    code = "unavailable"
    default_retry_after_s = 1


class CapacityFull(Unavailable):
    """Not enough memory is free now, and nothing idle can be evicted."""

    code = "capacity_full"


class Loading(Unavailable):
    """The model is loading; retry shortly, or send 'Prefer: wait=N'."""

    code = "loading"
    default_retry_after_s = 2


class InstanceBusy(Unavailable):
    """The instance is serving as many requests as it can and its queue is full."""

    code = "instance_busy"


class StateChanging(Unavailable):
    """The instance is changing state; retry."""

    code = "state_changing"


class GenerationFailed(Unavailable):
    """Generation failed."""

    code = "generation_failed"


class RuntimeFailed(Unavailable):
    """The runtime (processes, the Docker engine) could not do what an instance needed."""

    code = "runtime_failed"


class ClusterUnavailable(RuntimeFailed):
    """The Ray cluster is unreachable."""

    code = "cluster_unavailable"
    default_retry_after_s = 5


class DatabaseUnavailable(Unavailable):
    """The database is unreachable."""

    code = "database_unavailable"
    default_retry_after_s = 2


# -- handler APIs (issue 11) -------------------------------------------------------------------


class ApiNotFound(NotFound):
    """No such API."""

    code = "api_not_found"


class ApiNotReady(Conflict):
    """The API's current version is not available yet (building or benchmarking) or failed."""

    code = "api_not_ready"


class GrpcServiceTaken(Conflict):
    """The project's .proto defines a gRPC service another API already serves."""

    code = "grpc_service_taken"


class ApiNameTaken(Conflict):
    """A catalog model found on disk already has this API's model id."""

    code = "api_name_taken"


class InvalidApiName(Invalid):
    """The API name is invalid or reserved."""

    code = "invalid_api_name"


class InvalidProject(Invalid):
    """The uploaded project is not a safe tar.gz of a project."""

    code = "invalid_project"


class InvalidProjectSpec(Invalid):
    """The project's spec (mlcp.yaml) is invalid."""

    code = "invalid_spec"


class InvalidRequirements(Invalid):
    """The project's requirements.txt cannot be installed here."""

    code = "invalid_requirements"


class MissingBlob(Invalid):
    """A weight file the project lists has not been uploaded: PUT /apis/blobs/{sha256} first."""

    code = "missing_blob"


class BlobHashMismatch(Invalid):
    """The uploaded bytes do not have the SHA-256 of the URL."""

    code = "blob_hash_mismatch"


class HandlerError(InstanceError):
    """The API's handler raised an exception."""

    code = "handler_error"


class HandlerBadOutput(InstanceError):
    """The API's handler returned a value that is not JSON-serialisable."""

    code = "handler_bad_output"


class HandlerTimeout(InstanceTimeout):
    """The API's handler did not return in time."""

    code = "handler_timeout"


def error_classes() -> list[type[MlcpError]]:
    """Every class of the tree whose code a client can see, root first."""
    seen: list[type[MlcpError]] = []
    todo: list[type[MlcpError]] = [MlcpError]
    while todo:
        cls = todo.pop(0)
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen
