"""Job-status callbacks: the bodies CONTRACT.md defines, where they go, and an outbox that never drops one.

    outbox = CallbackOutbox(redis_client, make_callback_sink(settings))
    outbox.send_progress(processing_body(job_id))                      # best effort
    outbox.send_terminal(job_id, completed_body(job_id, paths, "image"),
                         same_transaction=lambda pipe: pipe.hset(...))  # persisted, then delivered
    outbox.deliver_due()                                                # every maintenance pass

Redis keys: hash `callbacks:pending` (jobId → JSON body), sorted set `callbacks:due` (jobId → when
to try next), hash `callbacks:attempts` (jobId → failed rounds), list `callbacks:dead` (JSON records of
bodies the receiver refused for good; `replay_dead` puts them back).
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Callable

import redis
import requests

from storage.base import StorageError, check_segment

PENDING = "callbacks:pending"
DUE = "callbacks:due"
ATTEMPTS = "callbacks:attempts"
DEAD = "callbacks:dead"
ERROR_MESSAGE_MAX = 2000
RETRYABLE_4XX = frozenset({408, 429})


class CallbackError(Exception):
    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.message = message
        self.retryable = retryable


# --- bodies ---------------------------------------------------------------------------------------
def completed_body(job_id: str, paths: list[str], content: str) -> dict:
    """filePath is always the first output: the live job-callback stores jobs.metadata.file_path only
    from filePath/outputUrl. Image jobs also get imageUrls (all outputs), which it prefers for images."""
    if not paths:
        raise ValueError("a completed job needs at least one output path")
    if content not in ("image", "video"):
        raise ValueError(f"content must be 'image' or 'video', got {content!r}")
    body = {"jobId": job_id, "status": "completed", "filePath": paths[0]}
    if content == "image":
        body["imageUrls"] = list(paths)
    return body


def failed_body(job_id: str, message: str) -> dict:
    message = str(message) or "failed"
    if len(message) > ERROR_MESSAGE_MAX:
        message = message[: ERROR_MESSAGE_MAX - 1] + "…"
    return {"jobId": job_id, "status": "failed", "errorMessage": message}


def processing_body(job_id: str) -> dict:
    return {"jobId": job_id, "status": "processing"}


def encode(body: dict) -> str:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def sign(secret: str, timestamp: str, raw_body: str) -> str:
    """`v1=<hex HMAC-SHA256(secret, "{timestamp}.{raw_body}")>`, what job-callback verifies."""
    digest = hmac.new(secret.encode(), f"{timestamp}.{raw_body}".encode(), hashlib.sha256).hexdigest()
    return f"v1={digest}"


# --- sinks ----------------------------------------------------------------------------------------
class HttpCallback:
    """POST {supabase_url}/functions/v1/job-callback."""

    def __init__(self, supabase_url: str, service_key: str, secret: str | None = None, timeout: float = 10.0,
                 session: requests.Session | None = None, clock: Callable[[], float] = time.time):
        self.endpoint = f"{supabase_url.rstrip('/')}/functions/v1/job-callback"
        self.service_key = service_key
        self.secret = secret
        self.timeout = timeout
        self.session = session or requests.Session()
        self.clock = clock

    def deliver(self, body: dict) -> None:
        raw = encode(body)
        headers = {"Authorization": f"Bearer {self.service_key}", "Content-Type": "application/json"}
        if self.secret:
            timestamp = str(int(self.clock()))
            headers["X-Callback-Timestamp"] = timestamp
            headers["X-Callback-Signature"] = sign(self.secret, timestamp, raw)
        try:
            # The signature covers these exact bytes, so send them as they are.
            response = self.session.post(self.endpoint, data=raw.encode(), headers=headers, timeout=self.timeout)
        except (requests.Timeout, requests.ConnectionError) as exc:
            raise CallbackError(f"job-callback unreachable: {type(exc).__name__}: {exc}", retryable=True) from exc
        except requests.RequestException as exc:
            raise CallbackError(f"job-callback request failed: {exc}", retryable=False) from exc
        if 200 <= response.status_code < 300:
            return
        text = (response.text or response.reason or "").strip()[:300]
        retryable = response.status_code >= 500 or response.status_code in RETRYABLE_4XX
        raise CallbackError(f"job-callback answered HTTP {response.status_code}: {text}", retryable=retryable)


class LocalStatusSink:
    """Local mode's job-callback: jobs_dir/{jobId}.json (latest status + history) and callbacks.jsonl."""

    def __init__(self, jobs_dir: Path | str, clock: Callable[[], float] = time.time):
        self.jobs_dir = Path(jobs_dir)
        self.clock = clock

    def deliver(self, body: dict) -> None:
        try:
            job_id = check_segment(body.get("jobId"), "jobId")
        except StorageError as exc:
            raise CallbackError(exc.message, retryable=False) from None
        now = self.clock()
        try:
            self.jobs_dir.mkdir(parents=True, exist_ok=True)
            # Several worker processes share the folder: serialize read-merge-write per folder.
            with open(self.jobs_dir / ".lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                with open(self.jobs_dir / "callbacks.jsonl", "a", encoding="utf-8") as log_file:
                    log_file.write(encode({**body, "receivedAt": now}) + "\n")
                self._merge(job_id, body, now)
        except OSError as exc:
            raise CallbackError(f"cannot write the status of {job_id}: {exc}", retryable=True) from exc

    def _merge(self, job_id: str, body: dict, now: float) -> None:
        path = self.jobs_dir / f"{job_id}.json"
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            record = {}
        if record.get("status") in ("completed", "failed") and (
                body.get("status") == "processing" or all(record.get(k) == v for k, v in body.items())):
            return  # a late progress report, or the outbox resending after a crash: nothing changes
        history = record.pop("history", [])
        if body.get("status") != "failed":
            record.pop("errorMessage", None)  # a later success must not carry an old failure
        record.update(body)
        record["updatedAt"] = now
        record["history"] = history + [{"status": body.get("status"), "at": now}]
        fd, tmp = tempfile.mkstemp(dir=self.jobs_dir, prefix=".status-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(record, handle, indent=1, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    def read(self, job_id: str) -> dict | None:
        path = self.jobs_dir / f"{check_segment(job_id, 'jobId')}.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def make_callback_sink(settings, session: requests.Session | None = None):
    if settings.supabase_url and settings.supabase_service_key:
        return HttpCallback(settings.supabase_url, settings.supabase_service_key, secret=settings.callback_secret,
                            timeout=settings.http_timeout, session=session)
    return LocalStatusSink(Path(settings.data_dir) / "jobs")


# --- outbox ---------------------------------------------------------------------------------------
# Each script acts only while the pending body is still the one the caller holds, so a newer
# terminal body for the same job (a re-run) is never removed or rescheduled by a stale delivery.
_CLAIM = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return false end
local body = redis.call('HGET', KEYS[2], ARGV[1])
if not body then redis.call('ZREM', KEYS[1], ARGV[1]) return false end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return body
"""
_ACK = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1]) redis.call('ZREM', KEYS[2], ARGV[1]) redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""
_RESCHEDULE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1]) redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
return 1
"""
_BURY = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1]) redis.call('ZREM', KEYS[2], ARGV[1]) redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('RPUSH', KEYS[4], ARGV[3])
return 1
"""


class CallbackOutbox:
    def __init__(self, redis, sink, clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
                 backoff_base: float = 2.0, backoff_cap: float = 300.0, grace: float = 60.0,
                 quick_tries: int = 3, quick_delay: float = 0.5, claim_lease: float = 120.0,
                 log: logging.Logger = logging.getLogger("workers.callback")):
        self.r = redis
        self.sink = sink
        self.clock = clock
        self.sleep = sleep
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.grace = grace              # others leave a fresh entry alone while its sender tries it
        self.quick_tries = quick_tries
        self.quick_delay = quick_delay
        self.claim_lease = claim_lease  # a claimer that dies mid-delivery frees the entry after this
        self.log = log
        self._claim = redis.register_script(_CLAIM)
        self._ack = redis.register_script(_ACK)
        self._reschedule = redis.register_script(_RESCHEDULE)
        self._bury = redis.register_script(_BURY)

    def send_progress(self, body: dict) -> bool:
        """One quick try, nothing persisted; a failure is logged, never raised."""
        try:
            self.sink.deliver(body)
            return True
        except CallbackError as exc:
            self.log.info("progress callback for %s not delivered: %s", body.get("jobId"), exc.message)
        except Exception:
            self.log.exception("progress callback for %s failed", body.get("jobId"))
        return False

    def send_terminal(self, job_id: str, body: dict, same_transaction: Callable | None = None) -> bool:
        """Persist `body` (with whatever `same_transaction(pipe)` adds, in one MULTI/EXEC), then deliver.

        Returns True when delivered now; False when it stays pending or went to callbacks:dead.
        Raises only if Redis itself fails, in which case nothing was persisted.
        """
        pipe = self.r.pipeline(transaction=True)
        self.persist(pipe, job_id, body)
        if same_transaction is not None:
            same_transaction(pipe)
        pipe.execute()
        try:
            return self.deliver_persisted(job_id, body)
        except redis.RedisError as exc:   # committed: the entry stays due, and deliver_due sends it
            self.log.warning("callback for %s persisted, delivery deferred: %s", job_id, exc)
            return False

    def persist(self, pipe, job_id: str, body: dict) -> None:
        """Queue the outbox entry's writes on `pipe` (a MULTI the caller executes with its own writes)."""
        pipe.hset(PENDING, job_id, encode(body))
        pipe.zadd(DUE, {job_id: self.clock() + self.grace})
        pipe.hdel(ATTEMPTS, job_id)

    def deliver_persisted(self, job_id: str, body: dict) -> bool:
        """A few quick tries of an entry `persist` wrote; what fails stays due for `deliver_due`."""
        raw = encode(body)
        error = None
        for attempt in range(1, self.quick_tries + 1):
            error = self._try(body)
            if error is None or not error.retryable:
                break
            if attempt < self.quick_tries:
                self.sleep(self.quick_delay * attempt)
        return self._settle(job_id, raw, error, attempts=0)

    def deliver_due(self, limit: int = 100) -> int:
        """Deliver pending callbacks whose time has come; returns how many were delivered.

        Safe with many workers: an entry is claimed atomically (its due time moves one lease ahead)
        before delivery, so exactly one caller delivers it.
        """
        now = self.clock()
        delivered = failures = 0
        for member in self.r.zrangebyscore(DUE, "-inf", now, start=0, num=limit):
            job_id = member.decode() if isinstance(member, bytes) else member
            raw = self._claim(keys=[DUE, PENDING], args=[job_id, repr(now), repr(now + self.claim_lease)])
            if raw is None:
                continue  # another worker claimed it, or it was already delivered
            raw = raw.decode() if isinstance(raw, bytes) else raw
            try:
                body = json.loads(raw)
            except ValueError:
                self._settle(job_id, raw, CallbackError("stored body is not JSON", retryable=False), 0)
                continue
            attempts = int(self.r.hget(ATTEMPTS, job_id) or 0)
            error = self._try(body)
            if self._settle(job_id, raw, error, attempts):
                delivered += 1
                failures = 0
            elif error is not None and error.retryable:
                failures += 1
                if failures >= 3:
                    break  # the receiver looks down: leave the rest due instead of timing out on each
        return delivered

    def pending_count(self) -> int:
        return int(self.r.hlen(PENDING))

    def dead(self) -> list[dict]:
        return [json.loads(item) for item in self.r.lrange(DEAD, 0, -1)]

    def replay_dead(self, limit: int = 100) -> int:
        """Put refused bodies back in the outbox (after the receiver was fixed); returns how many."""
        moved = 0
        for _ in range(limit):
            item = self.r.lpop(DEAD)
            if item is None:
                break
            record = json.loads(item)
            if not isinstance(record.get("body"), dict):
                self.r.rpush(DEAD, item)  # unreadable body: keep it for a person, never resend it
                continue
            pipe = self.r.pipeline(transaction=True)
            pipe.hsetnx(PENDING, record["jobId"], encode(record["body"]))
            pipe.zadd(DUE, {record["jobId"]: self.clock()}, nx=True)
            pipe.execute()
            moved += 1
        return moved

    # --- internals --------------------------------------------------------------------------------
    def _try(self, body: dict) -> CallbackError | None:
        try:
            self.sink.deliver(body)
            return None
        except CallbackError as exc:
            return exc
        except Exception as exc:  # a sink bug must not lose the entry: treat it as "try later"
            self.log.exception("callback sink raised unexpectedly for %s", body.get("jobId"))
            return CallbackError(f"{type(exc).__name__}: {exc}", retryable=True)

    def _backoff(self, attempts: int) -> float:
        return min(self.backoff_cap, self.backoff_base * 2 ** (attempts - 1) * random.uniform(0.8, 1.2))

    def _settle(self, job_id: str, raw: str, error: CallbackError | None, attempts: int) -> bool:
        """Record the outcome of one delivery round of `raw`; True when delivered."""
        keys = [PENDING, DUE, ATTEMPTS]
        if error is None:
            self._ack(keys=keys, args=[job_id, raw])
            return True
        if error.retryable:
            attempts += 1
            delay = self._backoff(attempts)
            self._reschedule(keys=keys, args=[job_id, raw, repr(self.clock() + delay), attempts])
            level = logging.ERROR if attempts >= 10 else logging.WARNING
            self.log.log(level, "callback for %s not delivered (round %d): %s; next try in %.0fs",
                         job_id, attempts, error.message, delay)
            return False
        try:
            kept = json.loads(raw)
        except ValueError:
            kept = raw
        record = encode({"jobId": job_id, "reason": error.message, "at": self.clock(),
                         "attempts": attempts + 1, "body": kept})
        self._bury(keys=keys + [DEAD], args=[job_id, raw, record])
        self.log.error("callback for %s REFUSED by the receiver and moved to %s: %s (body kept for replay_dead)",
                       job_id, DEAD, error.message)
        return False
