"""Output storage: Supabase Storage when configured, else files under DATA_DIR/storage."""
from __future__ import annotations

from storage.base import Storage, StorageError, check_segment, object_name
from storage.local import LocalStorage
from storage.supabase import SupabaseStorage

__all__ = ["Storage", "StorageError", "check_segment", "object_name", "LocalStorage", "SupabaseStorage",
           "make_storage"]


def make_storage(settings) -> Storage:
    if settings.supabase_url and settings.supabase_service_key:
        return SupabaseStorage(settings.supabase_url, settings.supabase_service_key, timeout=settings.http_timeout)
    return LocalStorage(settings.storage_dir)
