"""Domain errors raised by the core; ``diffq.app.api.errors`` maps each to one HTTP status."""

from __future__ import annotations

from dataclasses import dataclass


class DiffqError(Exception):
    """Base of every error a client can be told about; ``code`` is stable, the message human."""

    code = "error"
    headers: dict[str, str] | None = None  # HTTP headers the answer carries (e.g. Retry-After)

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class JobNotFoundError(DiffqError):
    """No such job: never created, deleted, or expired."""

    code = "job_not_found"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} does not exist (never created, deleted, or expired)")


class BatchNotFoundError(DiffqError):
    """No such batch: never created, deleted, expired, or another key's."""

    code = "batch_not_found"

    def __init__(self, batch_id: str) -> None:
        super().__init__(f"batch {batch_id!r} does not exist (never created, deleted, or expired)")


class ImageNotFoundError(DiffqError):
    """The job exists but has no such image (not finished, out of range, or expired)."""

    code = "image_not_found"


@dataclass(frozen=True)
class FieldProblem:
    """One bad request field and what would be accepted instead."""

    field: str
    message: str


class InvalidRequestError(DiffqError):
    """The request is well-formed but asks for something the model or deployment does not allow."""

    code = "invalid_request"

    def __init__(self, problems: list[FieldProblem]) -> None:
        super().__init__("; ".join(f"{p.field}: {p.message}" for p in problems))
        self.problems = problems


class UnknownModelError(InvalidRequestError):
    """The request names a model no live worker serves."""

    code = "unknown_model"


class UploadTooLargeError(DiffqError):
    """An uploaded file is bigger than the deployment accepts; refused before any decoding."""

    code = "upload_too_large"

    def __init__(self, field: str, size: int, limit: int, unit: str = "bytes") -> None:
        super().__init__(f"{field} is {size} {unit}; at most {limit} {unit} accepted")
        self.field = field
        self.size = size
        self.limit = limit


class JobFinishedError(DiffqError):
    """The job already succeeded or failed, so it can no longer be canceled."""

    code = "job_finished"


class StoreUnavailableError(DiffqError):
    """Redis cannot be reached; the request may succeed when it is back."""

    code = "store_unavailable"


class StoreFullError(StoreUnavailableError):
    """Redis refuses writes because it reached ``maxmemory``; nothing of the request was stored."""

    code = "redis_full"
    headers = {"Retry-After": "5"}


class NotReplicatedError(StoreUnavailableError):
    """The job was written but too few replicas confirmed it in time: not acknowledged.
    A retry with the same Idempotency-Key returns this job once replicas have it, never a second one."""

    code = "not_replicated"


class QueueFullError(DiffqError):
    """The model's queue holds as many jobs as the deployment allows (``max_queue_depth``)."""

    code = "queue_full"

    def __init__(self, model: str, depth: int, wait_seconds: float | None) -> None:
        wait = f"about {wait_seconds:.0f} s" if wait_seconds is not None else "unknown (no job has run yet)"
        super().__init__(f"model {model!r} already has {depth} queued jobs, its limit; the current wait is {wait}")
        retry = max(1, round(wait_seconds / max(depth, 1))) if wait_seconds else 5  # about one job's run
        self.headers = {"Retry-After": str(retry)}
        self.wait_seconds = wait_seconds


class ResultStoreUnavailableError(StoreUnavailableError):
    """The result store (file or s3) cannot be reached; the image is kept and can be read later."""

    code = "storage_unavailable"


class IdempotencyConflictError(DiffqError):
    """An Idempotency-Key came back with a different request body: replaying it would hide a mistake."""

    code = "idempotency_key_reused"

    def __init__(self, key: str, used_at: str) -> None:
        super().__init__(
            f"Idempotency-Key {key!r} was already used at {used_at} with a different request body; "
            "send a new key for a different request"
        )
        self.key = key
        self.used_at = used_at


class IdempotencyInProgressError(DiffqError):
    """The first request with this Idempotency-Key is still creating its job; retry in a moment."""

    code = "idempotency_key_in_progress"

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(
            f"a request with Idempotency-Key {key!r} is still creating job {job_id!r}; retry in a moment "
            "to get that job"
        )
        self.key = key
        self.job_id = job_id


class JobListingDisabledError(DiffqError):
    """``GET /v1/jobs`` on a deployment that has not turned listing on (``DIFFQ_JOB_LISTING``)."""

    code = "job_listing_disabled"

    def __init__(self) -> None:
        super().__init__(
            "listing jobs is off on this deployment (job ids are its only access control); "
            "set DIFFQ_JOB_LISTING=true on the API to turn it on"
        )


class UnauthorizedError(DiffqError):
    """No valid API key. One message for every reason (missing, malformed, unknown, wrong, revoked)."""

    code = "unauthorized"
    headers = {"WWW-Authenticate": 'Bearer realm="diffq"'}

    def __init__(self) -> None:
        super().__init__(
            "a valid API key is required: send `Authorization: Bearer <key>` (keys are made with `diffq keys create`)"
        )


class RateLimitedError(DiffqError):
    """The key made more requests than its rate allows; ``headers`` say when to come back."""

    code = "rate_limited"

    def __init__(self, rate: str, headers: dict[str, str]) -> None:
        super().__init__(f"this API key is limited to {rate} requests; retry after {headers['Retry-After']} s")
        self.headers = headers


#: Seconds between two reads of a job that is not done, as the API tells clients (``Retry-After``).
POLL_HINT_SECONDS = 1


class PollingTooFastError(DiffqError):
    """Plain reads of one job come faster than this API answers them (``diffq.app.api.polling``)."""

    code = "polling_too_fast"

    def __init__(self, job_id: str, retry_after: int) -> None:
        super().__init__(
            f"job {job_id!r} is being read faster than every {POLL_HINT_SECONDS} s; retry after "
            f"{retry_after} s, long-poll it with ?wait=, or stream its events"
        )
        self.headers = {"Retry-After": str(retry_after)}


class TooManyQueuedJobsError(DiffqError):
    """The key already has as many queued jobs as it may."""

    code = "too_many_queued_jobs"
    headers = {"Retry-After": "5"}

    def __init__(self, cap: int) -> None:
        super().__init__(f"this API key already has {cap} queued jobs, its limit; submit more once some have started")


class ContentCredentialsUnavailableError(DiffqError):
    """The caller's key requires C2PA content credentials and this deployment has no signing certificate."""

    code = "content_credentials_unavailable"

    def __init__(self) -> None:
        super().__init__(
            "this API key requires C2PA content credentials, and the deployment sets no signing "
            "certificate (DIFFQ_C2PA_CERT and DIFFQ_C2PA_KEY); ask its operator"
        )


class TooManyStreamsError(DiffqError):
    """The key already holds as many event streams open as it may."""

    code = "too_many_streams"
    headers = {"Retry-After": "5"}

    def __init__(self, most: int) -> None:
        super().__init__(
            f"this API key already has {most} event streams open, its limit; close one, or poll "
            "GET /v1/jobs/{id}?wait=N instead"
        )


class TooManyWaitsError(DiffqError):
    """The key already holds as many waits (long polls, event streams, OpenAI-endpoint requests) as it may."""

    code = "too_many_waits"
    headers = {"Retry-After": "5"}

    def __init__(self, most: int) -> None:
        super().__init__(
            f"this API key already has {most} waits open (long polls, event streams and "
            "/v1/images/generations requests together), its limit (DIFFQ_MAX_WAITS); let one end, or "
            "poll without wait"
        )


class TooManyUploadsError(DiffqError):
    """The key already has as many input images decoding and waiting to decode as it may."""

    code = "too_many_uploads"
    headers = {"Retry-After": "2"}

    def __init__(self, most: int) -> None:
        super().__init__(
            f"this API key already has {most} requests with input images being decoded or waiting "
            "to be, its limit on this API process (8 × DIFFQ_DECODE_CONCURRENCY_PER_KEY); retry once "
            "some have been answered"
        )


class ServerBusyError(DiffqError):
    """This API process is at one of its own limits (not a key's); another process, or a retry, may serve it."""

    code = "server_busy"
    headers = {"Retry-After": "1"}


class RequestTimeoutError(DiffqError):
    """The client did not send the request's body in time; the connection is closed."""

    code = "request_timeout"
    headers = {"Connection": "close"}

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the request body did not arrive within {seconds:g} s (DIFFQ_HTTP_BODY_TIMEOUT)")


class UnsupportedMediaTypeError(DiffqError):
    """The request body is neither JSON nor multipart/form-data."""

    code = "unsupported_media_type"

    def __init__(self, content_type: str | None) -> None:
        sent = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        super().__init__(f"{sent} is not accepted; send application/json, or multipart/form-data with image files")


class StoreBusyError(ServerBusyError):
    """Every pooled Redis connection of this API process is in use; Redis itself is reachable."""

    code = "store_busy"

    def __init__(self) -> None:
        super().__init__(
            "all of this API process's Redis connections for short commands are in use "
            "(DIFFQ_REDIS_MAX_CONNECTIONS); Redis itself is reachable; retry in a moment"
        )
