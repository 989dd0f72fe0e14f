"""The storage interface: where generated outputs go, and the path rules every backend shares.

    path = storage.upload(bucket, user_id, object_name(job_id, 0, "png"), data, "image/png")
    # path == f"{user_id}/{name}", the path inside the bucket that the callback reports

Object names depend only on (job, output index), so a job that runs twice overwrites its own
outputs instead of leaving duplicates behind.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from workers.config import SAFE_SEGMENT


class StorageError(Exception):
    """An upload failed. `retryable` is True when the same upload may succeed later."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.message = message
        self.retryable = retryable


def check_segment(value: object, what: str) -> str:
    """Return `value` if it is one safe path segment, else raise StorageError (not retryable).

    SAFE_SEGMENT already excludes '/', '\\', NUL, a leading '.', the empty string and more than
    128 characters; '..' inside a name is refused as well so no segment can read like traversal.
    """
    if not isinstance(value, str) or not SAFE_SEGMENT.match(value) or ".." in value:
        raise StorageError(f"{what} {str(value)[:80]!r} is not a safe path segment", retryable=False)
    return value


def object_name(job_id: str, index: int, ext: str) -> str:
    """Deterministic file name of output `index` of a job, e.g. `"{job_id}_0.png"`."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise StorageError(f"output index must be a non-negative integer, got {index!r}", retryable=False)
    check_segment(ext, "extension")
    return check_segment(f"{check_segment(job_id, 'jobId')}_{index}.{ext}", "object name")


@runtime_checkable
class Storage(Protocol):
    def upload(self, bucket: str, user_id: str, filename: str, data: bytes, content_type: str) -> str:
        """Store `data` at {bucket}/{user_id}/{filename}, replacing any object there.

        Returns the path inside the bucket, f"{user_id}/{filename}". Raises StorageError.
        """
        ...

    def read(self, bucket: str, path_in_bucket: str) -> bytes:
        """Bytes of `{bucket}/{path_in_bucket}`, the path `upload` returned. Raises StorageError."""
        ...
