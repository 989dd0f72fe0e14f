"""Fallback routing (seed 004, phase 2): an image job that its own worker cannot serve runs as its
job type's `fallback` (job_types.yaml) on the fallback's queue, instead of failing.

Two triggers:
- inside a worker, a model-side failure (the model is not loaded, or generation ran out of memory
  again after memory was freed): the runner calls `reroute_claim` with the claim it holds;
- in the orchestrator, a worker given up for good (FATAL): `rescue_stranded` empties that worker's
  queue, rerouting what has a fallback and failing the rest with a callback, so nothing waits on a
  worker that will not come back.

A job falls back only while a live worker serves the fallback's queue. The job keeps its jobId and userId. The rewritten payload says `fallback: {from, reason}`; its
outputs go to the fallback type's default bucket; the record and the completed callback carry both,
so the frontend knows where the files are and why. A job falls back at most once. FALLBACK_ROUTING=0
turns all of it off ("fail fast", the seed's phase 1): those jobs fail with the reason instead.
"""
from __future__ import annotations

import json
import logging
import socket
import time
from typing import Callable

import redis

from workers.callback import CallbackOutbox, failed_body, make_callback_sink
from workers.config import Catalog, JobTypeSpec
from workers.job import job_id_of
from workers.queue import Claim, JobRecords, ReliableQueue, daemon_worker_id, job_key, queue_overview

log = logging.getLogger("workers.fallback")
REASON_MAX_CHARS = 300


def fallback_payload(payload: dict, catalog: Catalog, reason: str) -> tuple[dict, JobTypeSpec] | None:
    """The payload rewritten for its job type's fallback, or None when it has none (or fell back already)."""
    spec = catalog.job_type(payload.get("jobType")) if isinstance(payload.get("jobType"), str) else None
    if spec is None or spec.fallback is None or payload.get("fallback") is not None:
        return None
    target = catalog.job_types[spec.fallback]
    queue = catalog.queue_of(target.name)
    rewritten = {**payload, "jobType": target.name, "modelType": target.name, "bucket": target.default_bucket,
                 "isSDXL": False, "fallback": {"from": spec.name, "reason": reason[:REASON_MAX_CHARS]}}
    meta = payload.get("metadata")
    if isinstance(meta, dict):
        rewritten["metadata"] = {k: v for k, v in meta.items() if k != "bucket"} | {"queue": queue}
    return rewritten, target


def has_live_worker(r: redis.Redis, queue: str) -> bool:
    """A job rerouted onto `queue` would run: some worker's heartbeat on it is fresh."""
    return any(w["alive"] for w in queue_overview(r, queue)["workers"])


def fallback_note(payload: dict) -> dict | None:
    """`{from, reason}` when this payload runs as a fallback (for the record and the callback)."""
    note = payload.get("fallback")
    if not isinstance(note, dict) or not isinstance(note.get("from"), str):
        return None
    return {"from": note["from"][:64], "reason": str(note.get("reason", ""))[:REASON_MAX_CHARS]}


def reroute_claim(queue: ReliableQueue, records: JobRecords, catalog: Catalog, claim: Claim, payload: dict,
                  reason: str) -> str | None:
    """Move a claimed job onto its fallback's queue (served next there). Returns the fallback type, or None."""
    routed = fallback_payload(payload, catalog, reason)
    if routed is None or claim.job_id is None:
        return None
    rewritten, target = routed
    target_queue = catalog.queue_of(target.name)
    if not has_live_worker(queue.r, target_queue):
        log.warning("job %s: no live worker serves %s; not falling back", claim.job_id, target_queue)
        return None
    with queue.r.pipeline(transaction=True) as pipe:
        pipe.lrem(queue.processing, 1, claim.raw)
        pipe.rpush(target_queue, json.dumps(rewritten))
        pipe.hset(job_key(claim.job_id), "attempts", 0)   # a new model, a fresh set of attempts
        _record_fallback(records, pipe, claim.job_id, payload["jobType"], target.name, target_queue, reason)
        pipe.execute()
    log.warning("job %s: %s falls back to %s on %s (%s)", claim.job_id, payload["jobType"], target.name, target_queue, reason)
    return target.name


def _record_fallback(records: JobRecords, pipe, job_id: str, source: str, target: str, target_queue: str,
                     reason: str) -> None:
    records.update(job_id, pipe=pipe, status="queued", phase="fell back", jobType=target, queue=target_queue,
                   fallback_from=source, fallback_reason=reason[:REASON_MAX_CHARS])


def rescue_stranded(r: redis.Redis, catalog: Catalog, queue: str, reason: str, outbox: CallbackOutbox,
                    records: JobRecords, enabled: bool, clock: Callable[[], float]) -> dict[str, int]:
    """Empty `queue`, whose worker was given up: reroute jobs that have a fallback (when `enabled`),
    fail the rest with a callback. Each move is one optimistic transaction on the queue's oldest item
    (the failed callback's outbox entry included), so a producer pushing meanwhile, or a crash half-way,
    never loses or duplicates a job."""
    counts = {"rerouted": 0, "failed": 0}
    live = {q for q in {w.queue for w in catalog.workers.values()} if has_live_worker(r, q)}
    while True:
        with r.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(queue)
                raw = pipe.lindex(queue, -1)
                if raw is None:
                    return counts
                outcome, failed = _rescue_one(pipe, catalog, queue, raw, reason, outbox, records, enabled, live, clock)
                pipe.execute()
            except redis.WatchError:
                continue    # a producer pushed meanwhile: read the oldest item again
        counts[outcome] += 1
        if failed is not None:
            outbox.deliver_persisted(failed["jobId"], failed)


def _rescue_one(pipe, catalog: Catalog, queue: str, raw: bytes, reason: str, outbox: CallbackOutbox,
                records: JobRecords, enabled: bool, live: set[str], clock: Callable[[], float]) -> tuple[str, dict | None]:
    """Queue the commands that move one item; returns the outcome and the failed callback body, if any."""
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError):
        payload = None
    job_id = job_id_of(raw)
    routed = fallback_payload(payload, catalog, reason) if enabled and isinstance(payload, dict) else None
    target_queue = catalog.queue_of(routed[1].name) if routed is not None else None
    pipe.multi()
    pipe.rpop(queue)
    if routed is not None and job_id and target_queue in live:
        rewritten, target = routed
        # The tail, in their order: a flood of rerouted jobs does not jump ahead of the target's own.
        pipe.lpush(target_queue, json.dumps(rewritten))
        _record_fallback(records, pipe, job_id, payload["jobType"], target.name, target_queue, reason)
        log.warning("job %s: %s falls back to %s (%s)", job_id, payload["jobType"], target.name, reason)
        return "rerouted", None
    if not enabled:
        why = "fallback routing is off"
    elif target_queue is not None:
        why = f"no live worker serves its fallback's queue {target_queue}"
    else:
        why = "this job type has no fallback"
    message = f"the {queue} worker is unavailable ({reason[:REASON_MAX_CHARS]}) and {why}"
    if job_id is None:
        pipe.lpush(f"{queue}:dead", json.dumps({"payload": raw.decode("utf-8", "replace"), "reason": message,
                                                 "jobId": None, "attempts": 0, "worker": "orchestrator", "at": clock()}))
        return "failed", None
    body = failed_body(job_id, message)
    outbox.persist(pipe, job_id, body)
    records.update(job_id, pipe=pipe, status="failed", phase="done", error=message, completed_at=clock())
    log.warning("job %s failed: %s", job_id, message)
    return "failed", body


class StrandedJobRescuer:
    """Run by the orchestrator after each supervisor poll: the queue of a worker given up for good is
    emptied by `rescue_stranded`, unless another live worker (another pod) still serves that queue."""

    def __init__(self, r: redis.Redis, catalog: Catalog, settings, clock: Callable[[], float] = time.time):
        self.r = r
        self.catalog = catalog
        self.enabled = settings.fallback_routing
        self.clock = clock
        self.records = JobRecords(r, clock)
        self.outbox = CallbackOutbox(r, make_callback_sink(settings), clock=clock)

    def check(self, statuses: dict[str, dict]) -> dict[str, dict[str, int]]:
        done = {}
        for name, status in statuses.items():
            spec = self.catalog.workers.get(name)
            if spec is None or status.get("state") != "fatal" or self._served_elsewhere(name, spec.queue):
                continue
            reason = f"the {name} worker stopped for good (exit code {status.get('last_exit')})"
            # The job it held when it died: no peer of that queue is left to reap it once its
            # heartbeat expires, so the rescuer does, and the job is rescued with the rest.
            ReliableQueue(self.r, spec.queue, f"rescuer@{socket.gethostname()}").reap()
            counts = rescue_stranded(self.r, self.catalog, spec.queue, reason, self.outbox, self.records,
                                     self.enabled, self.clock)
            if any(counts.values()):
                log.warning("%s: %d job(s) rerouted to their fallback, %d failed", spec.queue,
                            counts["rerouted"], counts["failed"])
            done[spec.queue] = counts
        return done

    def _served_elsewhere(self, name: str, queue: str) -> bool:
        ours = daemon_worker_id(name)
        return any(w["alive"] and w["id"] != ours for w in queue_overview(self.r, queue)["workers"])
