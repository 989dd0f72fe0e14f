"""Supabase Storage uploads (the path and headers CONTRACT.md documents), with bounded retries."""
from __future__ import annotations

import logging
import random
import time
from typing import Callable
from urllib.parse import quote

import requests

from storage.base import StorageError, check_segment

log = logging.getLogger("storage.supabase")

# 408 and 429 say "later", not "never"; every other 4xx means the request itself is wrong.
RETRYABLE_4XX = frozenset({408, 429})


def server_message(response: requests.Response) -> str:
    """The error text Supabase puts in its JSON body ({"error", "message"}), else the raw text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        parts = [str(body[k]) for k in ("error", "message") if body.get(k)]
        if parts:
            return ": ".join(dict.fromkeys(parts))
    return (response.text or response.reason or "").strip()[:300]


def effective_status(response: requests.Response) -> int:
    """Storage has answered HTTP 400 for every error, the real code in the body's `statusCode`
    (a 503 or 429 there is worth a retry); newer versions send it as the HTTP status."""
    if response.status_code == 400:
        try:
            code = response.json().get("statusCode")
        except (ValueError, AttributeError):
            code = None
        if isinstance(code, (str, int)) and str(code).isdigit() and 400 <= int(code) < 600:
            return int(code)
    return response.status_code


class SupabaseStorage:
    def __init__(self, url: str, service_key: str, timeout: float = 30.0, max_attempts: int = 5,
                 sleep: Callable[[float], None] = time.sleep, backoff_base: float = 0.5, backoff_cap: float = 8.0,
                 session: requests.Session | None = None):
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.url = url.rstrip("/")
        self.service_key = service_key
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.sleep = sleep
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.session = session or requests.Session()

    def _delay(self, attempt: int) -> float:
        # Jitter spreads the retries of several workers that failed at the same moment.
        return min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)

    def upload(self, bucket: str, user_id: str, filename: str, data: bytes, content_type: str) -> str:
        parts = [check_segment(bucket, "bucket"), check_segment(user_id, "userId"), check_segment(filename, "filename")]
        endpoint = f"{self.url}/storage/v1/object/" + "/".join(quote(p, safe="") for p in parts)
        headers = {
            "Authorization": f"Bearer {self.service_key}",
            "apikey": self.service_key,
            "Content-Type": content_type,
            "x-upsert": "true",
            "cache-control": "3600",
        }
        where = "/".join(parts)
        last = ""
        for attempt in range(1, self.max_attempts + 1):
            try:
                response = self.session.post(endpoint, data=data, headers=headers, timeout=self.timeout)
            except (requests.Timeout, requests.ConnectionError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            except requests.RequestException as exc:
                raise StorageError(f"upload of {where} failed: {exc}", retryable=False) from exc
            else:
                if 200 <= response.status_code < 300:
                    return f"{user_id}/{filename}"
                status = effective_status(response)
                message = f"HTTP {response.status_code}: {server_message(response)}"
                if status < 500 and status not in RETRYABLE_4XX:
                    raise StorageError(f"upload of {where} refused: {message}", retryable=False)
                last = message
            if attempt < self.max_attempts:
                delay = self._delay(attempt)
                log.warning("upload of %s failed (%s); attempt %d/%d, retrying in %.2fs",
                            where, last, attempt, self.max_attempts, delay)
                self.sleep(delay)
        raise StorageError(f"upload of {where} failed after {self.max_attempts} attempts: {last}", retryable=True)

    def read(self, bucket: str, path_in_bucket: str) -> bytes:
        """GET {url}/storage/v1/object/{bucket}/{userId}/{filename} with the service key (one attempt:
        the caller, a client waiting for its result, retries)."""
        parts = path_in_bucket.split("/") if isinstance(path_in_bucket, str) else [path_in_bucket]
        if len(parts) != 2:
            raise StorageError(f"path {str(path_in_bucket)[:80]!r} is not 'userId/filename'", retryable=False)
        segments = [check_segment(bucket, "bucket"), check_segment(parts[0], "userId"), check_segment(parts[1], "filename")]
        endpoint = f"{self.url}/storage/v1/object/" + "/".join(quote(p, safe="") for p in segments)
        headers = {"Authorization": f"Bearer {self.service_key}", "apikey": self.service_key}
        try:
            response = self.session.get(endpoint, headers=headers, timeout=self.timeout)
        except requests.RequestException as exc:
            raise StorageError(f"download of {bucket}/{path_in_bucket} failed: {exc}", retryable=True) from exc
        if response.status_code != 200:
            raise StorageError(f"download of {bucket}/{path_in_bucket} refused: HTTP {response.status_code}: "
                               f"{server_message(response)}", retryable=response.status_code >= 500)
        return response.content
