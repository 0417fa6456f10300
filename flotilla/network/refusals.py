"""Refusals: what the server answers when it will not do what a device asked, and what to do next.

Every refusal is a gRPC error whose status code says what the device should do, and whose
trailing metadata says it explicitly (``flotilla-retry``) with the refusal's reason (the counter
``status`` shows under ``rejected_by_reason``):

=====================  ====================  ============================================================
``flotilla-retry``     gRPC status           meaning
=====================  ====================  ============================================================
``request``            RESOURCE_EXHAUSTED,   transient (rate limit, another upload of this assignment in
                       UNAVAILABLE,          flight, an upload cut for stalling past upload_timeout_s):
                       DEADLINE_EXCEEDED     send the same request again after ``flotilla-retry-after-s``
                                             seconds, if given (back off in any case).
``checkin``            FAILED_PRECONDITION   this assignment is over (late: the round closed; expired;
                                             stale; revoked by a newer check-in; secure round aborted;
                                             version no longer served): drop it and check in again.
``never``              INVALID_ARGUMENT,     the request will never be accepted as it is (bad ticket,
                       PERMISSION_DENIED,    shape, dtype, non-finite values, a norm or value over the
                       UNAUTHENTICATED,      bound, bad numbers in the header, undecodable message):
                       ALREADY_EXISTS        give the assignment up (the server has revoked it) and say
                                             why; retrying the same update cannot succeed.  ALREADY_EXISTS
                                             after a retry means the first attempt counted.
=====================  ====================  ============================================================

A device that gets ``never`` for an update it trained should not check in again at once for the
same work: the server revokes the assignment, and in a sync round the device waits for the next
round (it would retrain to the same refused delta).
"""

from __future__ import annotations

RETRY_REQUEST = "request"
RETRY_CHECKIN = "checkin"
NEVER = "never"

RETRY_HEADER = "flotilla-retry"
REASON_HEADER = "flotilla-refusal"
RETRY_AFTER_HEADER = "flotilla-retry-after-s"

_BY_CODE = {
    "RESOURCE_EXHAUSTED": RETRY_REQUEST,
    "UNAVAILABLE": RETRY_REQUEST,
    "DEADLINE_EXCEEDED": RETRY_REQUEST,
    "FAILED_PRECONDITION": RETRY_CHECKIN,
}


def retry_class(code: str) -> str:
    """What a device should do after a refusal with this gRPC status name."""
    return _BY_CODE.get(code, NEVER)


class Refused(Exception):
    """An RPC refused: ``code`` names the gRPC status, ``reason`` the counter, ``str()`` the detail."""

    def __init__(self, code: str, reason: str, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.retry_after_s = retry_after_s

    @property
    def retry(self) -> str:
        return retry_class(self.code)

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        md = ((RETRY_HEADER, self.retry), (REASON_HEADER, self.reason))
        if self.retry_after_s is not None:
            md += ((RETRY_AFTER_HEADER, f"{self.retry_after_s:g}"),)
        return md


class InUse(ValueError):
    """``flotilla serve`` cannot start: its port or its state directory is taken (one line, exit 2)."""
