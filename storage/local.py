"""Local-mode storage: files under root/bucket/user_id/filename, written atomically."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from storage.base import StorageError, check_segment


class LocalStorage:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    def _target(self, bucket: str, user_id: str, filename: str) -> Path:
        parts = [check_segment(bucket, "bucket"), check_segment(user_id, "userId"), check_segment(filename, "filename")]
        root = self.root.resolve()
        target = root.joinpath(*parts)
        # A symlinked folder could still lead outside the root even with clean segments.
        if not target.resolve().is_relative_to(root):
            raise StorageError(f"{'/'.join(parts)} resolves outside the storage root", retryable=False)
        return target

    def upload(self, bucket: str, user_id: str, filename: str, data: bytes, content_type: str) -> str:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise StorageError(f"data must be bytes, got {type(data).__name__}", retryable=False)
        target = self._target(bucket, user_id, filename)
        tmp_name = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.parent.resolve().is_relative_to(self.root.resolve()):
                raise StorageError(f"{target.parent} resolves outside the storage root", retryable=False)
            # Same folder as the target, so os.replace is a rename: readers see old or new, never half.
            fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".upload-", suffix=".tmp")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, target)
            tmp_name = None
        except OSError as exc:
            # A full or failing disk may recover; the runner decides how often to retry.
            raise StorageError(f"cannot write {bucket}/{user_id}/{filename}: {exc}", retryable=True) from exc
        finally:
            if tmp_name is not None:
                try:
                    os.unlink(tmp_name)
                except OSError:
                    pass
        return f"{user_id}/{filename}"

    def read(self, bucket: str, path_in_bucket: str) -> bytes:
        """Bytes of `{bucket}/{path_in_bucket}` as `upload` returned it ("{user_id}/{filename}")."""
        parts = path_in_bucket.split("/") if isinstance(path_in_bucket, str) else [path_in_bucket]
        if len(parts) != 2:
            raise StorageError(f"path {str(path_in_bucket)[:80]!r} is not 'userId/filename'", retryable=False)
        target = self._target(bucket, parts[0], parts[1])
        try:
            return target.read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read {bucket}/{path_in_bucket}: {exc}", retryable=False) from exc
