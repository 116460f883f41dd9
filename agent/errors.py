"""The agent's error tree.

Every error the agent raises on purpose derives from :class:`AgentError`. Each class carries the HTTP status
the local API answers with and the OpenAI error ``type``/``code``; the API maps errors to responses in one
place (``agent/api/errors.py``) by reading these attributes, so adding an error never means touching the routes.

::

    AgentError                         500 internal_error
     ├── ConfigError                   500 configuration file or environment is invalid
     ├── LocalStateError               500 local state the agent cannot start with (exit EXIT_BAD_LOCAL_STATE)
     ├── RegistryError                 500
     │    ├── ModelNotFoundError       404 no such model / variant / version
     │    ├── ModelStateError          409 the operation does not fit the model's state (e.g. rollback with no previous)
     │    ├── InvalidModelError        400 the file is not a valid model (GGUF header, ONNX graph, format)
     │    ├── IntegrityError           400 length or sha256 differ from what was expected
     │    ├── InsufficientSpaceError   507 not enough free disk (checked before copying)
     │    └── QuarantinedError         409 the release crashed the agent too often or failed its health check
     ├── InferenceError                500
     │    ├── EngineLoadError          503 the engine could not load the model
     │    ├── MemoryBudgetError        503 the model does not fit the memory budget even after unloading others
     │    ├── OverloadedError          429 the queue is full (carries ``retry_after`` seconds)
     │    └── DeadlineExceededError    504 the request's deadline passed
     ├── ApiError                      400 a request the local API refuses
     │    ├── BadRequestError          400 malformed or out-of-range input
     │    ├── AuthenticationError      401 missing or wrong credentials
     │    ├── PermissionDeniedError    403 credentials valid but not allowed
     │    └── PayloadTooLargeError     413 body over the configured limit
     └── LinkError                     503 the link to the controller (agent/link/)
          ├── EnrollmentError          500 no, or an invalid, enrollment bundle
          └── OutboxFullError          503 too many messages wait for the controller's ack

``edge-agent run`` exits with :data:`EXIT_BAD_LOCAL_STATE` on a :class:`LocalStateError` (and on an invalid
configuration): a restart would meet the same state, so the shipped unit lists that status in
``RestartPreventExitStatus=`` and the operator fixes the state (docs/operations.md, "Bad local state").
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "EXIT_BAD_LOCAL_STATE",
    "AgentError",
    "ApiError",
    "AuthenticationError",
    "BadRequestError",
    "ConfigError",
    "DeadlineExceededError",
    "EngineLoadError",
    "EnrollmentError",
    "InferenceError",
    "InsufficientSpaceError",
    "IntegrityError",
    "InvalidModelError",
    "LinkError",
    "LocalStateError",
    "MemoryBudgetError",
    "ModelNotFoundError",
    "ModelStateError",
    "OutboxFullError",
    "OverloadedError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "QuarantinedError",
    "RegistryError",
]


class AgentError(Exception):
    """Root of the agent's own errors."""

    http_status: int = 500
    error_type: str = "internal_error"
    error_code: str | None = None


class ConfigError(AgentError):
    """The configuration file or environment is invalid."""


EXIT_BAD_LOCAL_STATE: Final = 78
"""``edge-agent run``'s exit status for bad local state or configuration (sysexits' ``EX_CONFIG``)."""


class LocalStateError(AgentError):
    """Local state the agent cannot start with and a restart would not change (a garbage ``registry.db``,
    a state directory that is a file, a regular file at the socket path): the process exits with
    :data:`EXIT_BAD_LOCAL_STATE` and systemd does not restart it."""


class RegistryError(AgentError):
    """A model registry operation failed."""


class ModelNotFoundError(RegistryError):
    """No model with that name, variant or version."""

    http_status = 404
    error_type = "invalid_request_error"
    error_code = "model_not_found"


class ModelStateError(RegistryError):
    """The operation does not fit the model's current state."""

    http_status = 409
    error_type = "invalid_request_error"
    error_code = "conflict"


class InvalidModelError(RegistryError):
    """The file is not a valid model of its declared format."""

    http_status = 400
    error_type = "invalid_request_error"
    error_code = "invalid_model"


class IntegrityError(RegistryError):
    """Length or sha256 differ from what was expected."""

    http_status = 400
    error_type = "invalid_request_error"
    error_code = "integrity_mismatch"


class InsufficientSpaceError(RegistryError):
    """Not enough free disk space for the operation (checked before any byte is copied)."""

    http_status = 507
    error_type = "server_error"
    error_code = "insufficient_storage"


class QuarantinedError(RegistryError):
    """The release is quarantined: it crashed the agent repeatedly or failed its health check."""

    http_status = 409
    error_type = "invalid_request_error"
    error_code = "model_quarantined"


class InferenceError(AgentError):
    """An inference engine failed."""


class EngineLoadError(InferenceError):
    """The engine could not load the model."""

    http_status = 503
    error_type = "server_error"
    error_code = "model_load_failed"


class MemoryBudgetError(InferenceError):
    """The model does not fit the memory budget even after unloading every unpinned idle model."""

    http_status = 503
    error_type = "server_error"
    error_code = "memory_budget_exceeded"


class OverloadedError(InferenceError):
    """The request queue is full; try again after ``retry_after`` seconds."""

    http_status = 429
    error_type = "rate_limit_error"
    error_code = "queue_full"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceededError(InferenceError):
    """The request's deadline passed before it finished."""

    http_status = 504
    error_type = "timeout_error"
    error_code = "deadline_exceeded"


class ApiError(AgentError):
    """A request the local API refuses."""

    http_status = 400
    error_type = "invalid_request_error"


class BadRequestError(ApiError):
    """Malformed or out-of-range input."""

    http_status = 400
    error_code = "invalid_request"


class AuthenticationError(ApiError):
    """Missing or wrong credentials."""

    http_status = 401
    error_type = "authentication_error"
    error_code = "invalid_api_key"


class PermissionDeniedError(ApiError):
    """Valid credentials that are not allowed to do this."""

    http_status = 403
    error_type = "permission_error"
    error_code = "forbidden"


class PayloadTooLargeError(ApiError):
    """The request body is larger than the configured limit."""

    http_status = 413
    error_code = "payload_too_large"


class LinkError(AgentError):
    """The link to the controller (enrollment, outbox, MQTT) failed; the agent keeps serving regardless."""

    http_status = 503
    error_type = "server_error"
    error_code = "link_unavailable"


class EnrollmentError(LinkError):
    """The device is not enrolled, or its enrollment bundle is invalid."""

    http_status = 500
    error_code = "not_enrolled"


class OutboxFullError(LinkError):
    """Too many messages wait for the controller's ack; new ones are refused rather than dropped."""

    error_code = "outbox_full"
