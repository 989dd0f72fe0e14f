"""A reliable queue on plain Redis lists (rq/Sidekiq super_fetch style), plus job records.

Producers LPUSH JSON payloads onto `{queue}`. A worker claims the oldest one (right end) with
BLMOVE into its own `{queue}:processing:{worker_id}` list, so a job is never only in a process's
memory. While alive, the worker refreshes `worker:{worker_id}` (a key with a TTL). Every worker
runs the reaper: a registered worker whose heartbeat key expired is dead, and its processing list
goes back to the queue's right end (served next). Attempts are counted at claim time in the job
record, so a payload that kills its worker every time ends in `{queue}:dead` after max_attempts.

Keys (all prefixed by nothing, to stay compatible with the live queue names):
  {queue}                       pending payloads (LPUSH by producers, oldest at the right)
  {queue}:processing:{worker}   claimed, not yet acked
  {queue}:workers               set of registered worker ids
  {queue}:dead                  dead letters: JSON {payload, reason, jobId, attempts, at}
  worker:{worker}               heartbeat JSON, expires after heartbeat_ttl
  job:{jobId}                   hash: status, attempts, step, steps, phase, outputs, error, ...
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Callable, Collection

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from workers.job import job_id_of

JOB_RECORD_TTL = 7 * 24 * 3600
log = logging.getLogger("workers.queue")


def connect(url: str, block_timeout: float = 5.0) -> redis.Redis:
    """A client that retries dropped connections with capped backoff; reads outlast BLMOVE's wait."""
    return redis.Redis.from_url(
        url,
        socket_timeout=block_timeout + 10,
        socket_connect_timeout=5,
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=5.0, base=0.1), retries=5),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def default_worker_id(name: str) -> str:
    """Stable per host and slot, so a restarted worker recovers its predecessor's claims at once."""
    return os.environ.get("WORKER_ID") or daemon_worker_id(name, {})


def daemon_worker_id(name: str, env=os.environ) -> str:
    """The id the daemon gives its `name` worker: `{WORKER_ID}-{name}` when the pod sets WORKER_ID
    (one id for two workers would share a heartbeat key), else the default."""
    return f"{env['WORKER_ID']}-{name}" if env.get("WORKER_ID") else f"{name}@{socket.gethostname()}"


@dataclass(frozen=True)
class Claim:
    raw: bytes
    job_id: str | None
    attempts: int           # including this one


class ReliableQueue:
    def __init__(self, client: redis.Redis, queue: str, worker_id: str, heartbeat_ttl: float = 30.0,
                 legacy_queues: tuple[str, ...] = (), clock: Callable[[], float] = time.time):
        self.r = client
        self.queue = queue
        self.worker_id = worker_id
        self.heartbeat_ttl = heartbeat_ttl
        self.legacy_queues = tuple(legacy_queues)
        self.clock = clock
        self.processing = processing_key(queue, worker_id)
        self.workers_key = f"{queue}:workers"
        self.dead_key = f"{queue}:dead"
        self.heartbeat_key = f"worker:{worker_id}"
        self.scripting = True      # False once Redis refused the claim script

    # --- lifecycle -------------------------------------------------------------------------
    def register(self, info: dict | None = None) -> int:
        """Join the worker set and take back whatever a previous process with our id left claimed."""
        self.heartbeat(info or {"state": "starting"})
        self.r.sadd(self.workers_key, self.worker_id)
        return self.recover_own()

    def deregister(self) -> None:
        self.recover_own()
        self.r.srem(self.workers_key, self.worker_id)
        self.r.delete(self.heartbeat_key)

    def heartbeat(self, info: dict) -> None:
        """Refresh our key, and (re)join the worker set: after an outage longer than the TTL a peer
        took us for dead and removed us, and unlisted we would never be reaped again."""
        body = {"pid": os.getpid(), "host": socket.gethostname(), "queue": self.queue, "at": self.clock(), **info}
        with self.r.pipeline(transaction=False) as pipe:
            pipe.set(self.heartbeat_key, json.dumps(body), px=int(self.heartbeat_ttl * 1000))
            pipe.sadd(self.workers_key, self.worker_id)
            pipe.execute()

    # --- claim / ack ------------------------------------------------------------------------
    def claim(self, timeout: float, prefer: Collection[str] = (), window: int = 8, max_skips: int = 3) -> Claim | None:
        """Block up to `timeout` seconds for the oldest job; it moves atomically to our processing list.

        `prefer` (job types, e.g. those of the models already on the GPU): among the `window` oldest
        jobs, the oldest of a preferred type goes first, unless the oldest job has already been passed
        over `max_skips` times (counted in its record): nothing waits forever."""
        raw = self._claim_preferred(prefer, window, max_skips) if prefer else None
        if raw is None:
            raw = self.r.blmove(self.queue, self.processing, timeout, "RIGHT", "LEFT")
        if raw is None:
            return None
        job_id = job_id_of(raw)
        attempts = int(self.r.hincrby(job_key(job_id), "attempts", 1)) if job_id else 1
        return Claim(raw=raw, job_id=job_id, attempts=attempts)

    def waiting(self) -> int:
        """Jobs in the queue, not yet claimed."""
        return int(self.r.llen(self.queue))

    def _claim_preferred(self, prefer: Collection[str], window: int, max_skips: int) -> bytes | None:
        if not self.scripting:
            return None
        try:
            return self.r.eval(_CLAIM_PREFERRED, 2, self.queue, self.processing, window, max_skips, *sorted(prefer)) or None
        except redis.ResponseError as exc:   # a Redis that refuses scripts (or cjson): plain FIFO from now on
            log.warning("Redis refused the resident-first claim script (%s); claiming oldest first", exc)
            self.scripting = False
            return None

    def ack(self, claim: Claim, pipe=None) -> None:
        """Release the claim; with `pipe`, as part of the caller's transaction."""
        (self.r if pipe is None else pipe).lrem(self.processing, 1, claim.raw)

    def requeue(self, claim: Claim, count_attempt: bool) -> None:
        """Back to the right end (served next). A shutdown does not count as an attempt."""
        with self.r.pipeline(transaction=True) as pipe:
            pipe.lrem(self.processing, 1, claim.raw)
            pipe.rpush(self.queue, claim.raw)
            if claim.job_id and not count_attempt:
                pipe.hincrby(job_key(claim.job_id), "attempts", -1)
            pipe.execute()

    def dead_letter(self, claim: Claim, reason: str, pipe=None) -> None:
        """Move the claim to the dead-letter list; with `pipe`, as part of the caller's transaction."""
        if pipe is None:
            with self.r.pipeline(transaction=True) as own:
                self.dead_letter(claim, reason, own)
                own.execute()
            return
        entry = {"payload": claim.raw.decode("utf-8", "replace"), "reason": reason, "jobId": claim.job_id,
                 "attempts": claim.attempts, "worker": self.worker_id, "at": self.clock()}
        pipe.lrem(self.processing, 1, claim.raw)
        pipe.lpush(self.dead_key, json.dumps(entry))

    # --- housekeeping, run by every worker between jobs -------------------------------------
    def recover_own(self, keep: bytes | None = None) -> int:
        """Move our own processing list back: claims whose BLMOVE reply was lost, or whose finishing
        met a Redis error. `keep`: the claim still being finished (it stays)."""
        with self.r.pipeline(transaction=True) as pipe:
            while True:   # WATCH: a peer's reaper moving our list meanwhile makes us read it again
                try:
                    pipe.watch(self.processing)
                    moving = pipe.lrange(self.processing, 0, -1)   # newest first; the oldest ends rightmost
                    if keep in moving:
                        moving.remove(keep)
                    if not moving:        # the usual case: nothing to move, no transaction
                        pipe.unwatch()
                        return 0
                    pipe.multi()
                    for raw in moving:
                        pipe.lrem(self.processing, 1, raw)
                        pipe.rpush(self.queue, raw)
                    pipe.execute()
                    return len(moving)
                except redis.WatchError:
                    continue

    def reap(self) -> int:
        """Requeue the claims of registered workers whose heartbeat expired."""
        moved = 0
        for member in self.r.smembers(self.workers_key):
            worker = member.decode()
            if worker == self.worker_id or self.r.exists(f"worker:{worker}"):
                continue
            count = _move_all(self.r, processing_key(self.queue, worker), self.queue)
            self.r.srem(self.workers_key, worker)
            if count:
                log.warning("reaped %d job(s) of dead worker %s back onto %s", count, worker, self.queue)
            moved += count
        return moved

    def drain_legacy(self) -> int:
        """Move jobs from deprecated lists (job_queue) onto our queue, oldest first."""
        moved = 0
        for legacy in self.legacy_queues:
            while self.r.lmove(legacy, self.queue, "RIGHT", "LEFT") is not None:
                moved += 1
        return moved


# KEYS: queue, processing list. ARGV: window, max skips, preferred job types. Returns the claimed
# payload, or false for "claim the oldest as usual" (no preferred job in the window, the oldest is
# preferred itself, or it was passed over too often already).
_CLAIM_PREFERRED = """
local items = redis.call('LRANGE', KEYS[1], -tonumber(ARGV[1]), -1)
local n = #items
if n < 2 then return false end
local preferred = {}
for i = 3, #ARGV do preferred[ARGV[i]] = true end
local function fields(raw)
  local ok, body = pcall(cjson.decode, raw)
  if ok and type(body) == 'table' then return body['jobType'], body['jobId'] end
  return nil, nil
end
local oldest_type, oldest_id = fields(items[n])
if oldest_type ~= nil and preferred[oldest_type] then return false end
for i = n - 1, 1, -1 do
  local job_type = fields(items[i])
  if job_type ~= nil and preferred[job_type] then
    if type(oldest_id) ~= 'string' or
       redis.call('HINCRBY', 'job:' .. oldest_id, 'skipped', 1) > tonumber(ARGV[2]) then
      return false
    end
    redis.call('LREM', KEYS[1], -1, items[i])
    redis.call('LPUSH', KEYS[2], items[i])
    return items[i]
  end
end
return false
"""


def processing_key(queue: str, worker_id: str) -> str:
    return f"{queue}:processing:{worker_id}"


def job_key(job_id: str) -> str:
    return f"job:{job_id}"


def _move_all(r: redis.Redis, source: str, queue: str) -> int:
    # Newest first onto the right end, so the oldest ends up rightmost (served first). LMOVE is
    # atomic per item, so two reapers racing never duplicate a job.
    moved = 0
    while r.lmove(source, queue, "LEFT", "RIGHT") is not None:
        moved += 1
    return moved


class JobRecords:
    """The `job:{id}` hash the CLI reads: status, progress, outputs. Expires after a week."""

    def __init__(self, client: redis.Redis, clock: Callable[[], float] = time.time):
        self.r = client
        self.clock = clock

    def update(self, job_id: str, pipe=None, **fields) -> None:
        values = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in fields.items() if v is not None}
        values["updated_at"] = self.clock()
        target = pipe if pipe is not None else self.r.pipeline(transaction=True)
        target.hset(job_key(job_id), mapping=values)
        target.expire(job_key(job_id), JOB_RECORD_TTL)
        if pipe is None:
            target.execute()

    def get(self, job_id: str) -> dict:
        raw = self.r.hgetall(job_key(job_id))
        record = {k.decode(): v.decode() for k, v in raw.items()}
        for key in ("outputs", "seeds"):
            if key in record:
                record[key] = json.loads(record[key])
        return record

    def status(self, job_id: str) -> str | None:
        value = self.r.hget(job_key(job_id), "status")
        return value.decode() if value else None


def queue_overview(r: redis.Redis, queue: str) -> dict:
    """Lengths and workers of one queue, for the CLI and health checks."""
    workers = []
    in_processing = 0
    for member in sorted(r.smembers(f"{queue}:workers")):
        worker = member.decode()
        beat = r.get(f"worker:{worker}")
        claimed = r.llen(processing_key(queue, worker))
        in_processing += claimed
        workers.append({"id": worker, "alive": beat is not None, "claimed": claimed,
                        **(json.loads(beat) if beat else {})})
    return {"queue": queue, "pending": r.llen(queue), "processing": in_processing,
            "dead": r.llen(f"{queue}:dead"), "workers": workers}
