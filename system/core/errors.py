"""One error root. Each subclass carries the HTTP status it maps to; the API maps them in one place."""

from __future__ import annotations


class ServiceError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequest(ServiceError):
    status = 400
    code = "bad_request"


class Unauthorized(ServiceError):
    """No credentials, or the wrong ones, for an admin route."""

    status = 401
    code = "unauthorized"


class Forbidden(ServiceError):
    """A route this deployment has turned off."""

    status = 403
    code = "forbidden"


class NotFound(ServiceError):
    status = 404
    code = "not_found"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "payload_too_large"


class Unavailable(ServiceError):
    """A dependency (a shard, NATS, PostgreSQL) cannot serve right now; retrying later helps."""

    status = 503
    code = "unavailable"


class ConfigError(ServiceError):
    """Invalid configuration: raised at start-up, names the offending variable."""

    code = "config_error"


class MalformedEvent(ServiceError):
    """A feedback event that does not match the contract; it is dead-lettered, never applied."""

    status = 400
    code = "malformed_event"


class Moved(Unavailable):
    """The user's slot is not (or no longer) that shard's: a re-shard moved it, or is moving it.
    Asking again with the current slot map helps."""


class TimedOut(Unavailable):
    """A call got no answer in time: the callee may be hung."""


class Restarting(Unavailable):
    """The callee crashed and is being restarted (by Ray); waiting helps, killing it does not."""


class NotThisOne(Unavailable):
    """One request of a batch failed on its shard (its user's state could not be read in time, a
    bug in their slate): that request only. The shard serves the others; the caller answers this
    one from popularity, and does not take the shard for down."""
