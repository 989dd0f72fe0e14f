"""The worker loop, as a checklist:

    claim → parse → (already done? too many attempts?) → processing → check → generate
          → encode → upload → completed + ack (record, callback outbox and claim: one transaction)
          → callback delivery

The part after generate (`_finish`) runs on the Finisher's thread while the next job generates
(OVERLAP_FINISH=0: inline). Each error class has its own branch in `_guarded()`, wherever the
step runs. Nothing here knows which model runs; the families (workers/pipelines/) do not know
about Redis, storage or callbacks.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Callable

import redis

from storage import Storage
from storage.base import StorageError, object_name
from workers import faults, media
from workers.fallback import fallback_note, reroute_claim
from workers.callback import CallbackOutbox, completed_body, failed_body, processing_body
from workers.config import Catalog, Settings
from workers.job import Job, JobRejected, parse_job
from workers.logs import job_context
from workers.metrics import count_job, job_type_label, observe_duration
from workers.pipelines.base import GenerationOutOfMemory, ModelUnavailable
from workers.queue import Claim, JobRecords, ReliableQueue

log = logging.getLogger("workers.runner")
PROGRESS_INTERVAL = 0.25  # seconds between progress writes; the last step is always written
OOM_RESTART_AFTER = 3     # consecutive out-of-memory failures after which the worker exits to be restarted
EX_TEMPFAIL = 75          # the worker's exit code then (sysexits.h): a fresh process may succeed
# compile_at: idle — a worker whose queue has not been empty for this long compiles anyway: a
# deferred compile costs 20–40 s once and saves 5–20% of every later job.
ACCELERATE_AFTER_BUSY_SECONDS = 300.0


class JobTimedOut(Exception):
    pass


class JobInterrupted(Exception):
    """Shutdown asked us to give the job back."""


@dataclass
class StopFlags:
    """`graceful`: finish the current job, then exit. `now`: give the current job back at the next step."""

    graceful: threading.Event = field(default_factory=threading.Event)
    now: threading.Event = field(default_factory=threading.Event)


class Finisher:
    """Runs a generated job's encoding, upload and callback on its own thread while the worker
    generates the next one, so the GPU does not wait for PNG/MP4 encoding and uploads. At most one
    job finishes at a time: `submit` waits for the previous one, which bounds memory and keeps order.
    Until a job is acknowledged it stays in the processing list, so a kill loses nothing."""

    def __init__(self):
        self._tasks: SimpleQueue = SimpleQueue()
        self._outstanding = 0
        self._done = threading.Condition()
        threading.Thread(target=self._loop, name="finisher", daemon=True).start()

    def submit(self, task: Callable[[], None]) -> None:
        self.drain()
        with self._done:
            self._outstanding += 1
        self._tasks.put(task)

    def drain(self) -> None:
        with self._done:
            self._done.wait_for(lambda: self._outstanding == 0)

    def _loop(self) -> None:
        while True:
            task = self._tasks.get()
            try:
                task()
            except Exception:      # _finish_in_background handles every error; this is a last guard
                log.exception("finishing a job failed")
            finally:
                with self._done:
                    self._outstanding -= 1
                    self._done.notify_all()


class Runner:
    def __init__(self, *, catalog: Catalog, settings: Settings, queue: ReliableQueue, records: JobRecords,
                 storage: Storage, outbox: CallbackOutbox, families: dict, load_errors: dict[str, str],
                 worker_type: str, clock: Callable[[], float] = time.time):
        self.catalog = catalog
        self.settings = settings
        self.queue = queue
        self.records = records
        self.storage = storage
        self.outbox = outbox
        self.families = families          # model key → loaded family
        self.load_errors = load_errors    # model key → why it is not loaded
        self.worker_type = worker_type
        self.clock = clock
        self.stop = StopFlags()
        self.current_job: str | None = None
        self._last_maintenance = 0.0
        self.oom_streak = 0
        self.exit_code = 0                # what the worker process exits with once serve() returns
        self.finisher = Finisher() if settings.overlap_finish else None
        self.busy_since = clock()         # when the queue was last found empty
        self.compiling: str | None = None  # the model whose deferred compile is running
        self.finishing: Claim | None = None  # the claim on the finisher's thread (set by the loop, cleared by it)

    # --- the loop -------------------------------------------------------------------------
    def serve(self) -> None:
        backoff = 0.5
        try:
            while not self.stop.graceful.is_set():
                try:
                    self.maintenance()
                    claim = self.queue.claim(self.settings.claim_timeout, prefer=self._preferred_job_types())
                    if claim is not None and self.stop.graceful.is_set():   # claimed while stopping: not started
                        self.queue.requeue(claim, count_attempt=False)
                        break
                    if claim is None:
                        self.busy_since = self.clock()
                        self.accelerate_deferred()
                    else:
                        self.handle(claim)
                        if self.clock() - self.busy_since >= ACCELERATE_AFTER_BUSY_SECONDS:
                            self.accelerate_deferred(one_stage=True)
                    backoff = 0.5
                except redis.RedisError as exc:   # unreachable, or refusing for now (READONLY in a failover, LOADING)
                    log.warning("redis failed (%s: %s); retrying in %.1fs", type(exc).__name__, exc, backoff)
                    self.stop.graceful.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
        finally:
            if self.finisher is not None:
                self.finisher.drain()     # the last job's outputs and callback, before the claims are returned

    def accelerate_deferred(self, one_stage: bool = False) -> None:
        """compile_at: idle (job_types.yaml) — each family's deferred compile and warm-ups, between
        jobs. It runs in stages (one warm-up shape each) and stops between two when a job arrived or
        a stop was asked; `one_stage`: the worker has been busy for long, so one stage runs between
        two jobs. Cheap when nothing is deferred; a failure leaves that model serving as it was."""
        def pause() -> bool:
            if one_stage or self.stop.graceful.is_set():
                return True
            try:
                return self.queue.waiting() > 0
            except redis.RedisError:   # the loop's next claim meets the same error and backs off
                return True

        for key, family in self.families.items():
            if getattr(family, "deferred", None) is None:   # nothing deferred (or not on the device)
                continue
            self.compiling = key          # the heartbeat says so: the worker is alive, not claiming
            try:
                report = family.accelerate_deferred(pause)
            except Exception:   # an optional speed-up must not take the worker down
                log.exception("deferred acceleration of %s failed; it keeps serving as it was", key)
                continue
            finally:
                self.compiling = None
            if report is None:
                log.info("deferred acceleration of %s paused: a job goes first", key)
                return
            log.info("model %s accelerated while idle: %s in %.1fs", key, report.get("applied"),
                     report.get("seconds", 0.0))

    def _preferred_job_types(self) -> list[str]:
        """Job types of the models on the GPU, when the worker swaps models (pipelines/residency.py)."""
        residency = getattr(self.families, "residency", None)
        if residency is None or residency.budget is None:
            return []
        resident = set(residency.resident_keys())
        return [name for name, spec in self.catalog.job_types.items() if spec.model in resident]

    def maintenance(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last_maintenance < self.settings.maintenance_interval:
            return
        self._last_maintenance = now
        # Claims whose BLMOVE reply was lost in a reconnect, or whose finishing met a Redis error.
        self.queue.recover_own(keep=None if self.finishing is None else self.finishing.raw)
        self.queue.reap()
        self.queue.drain_legacy()
        self.outbox.deliver_due()

    # --- one job --------------------------------------------------------------------------
    def handle(self, claim: Claim) -> None:
        try:
            job = parse_job(claim.raw, self.catalog)
        except JobRejected as exc:
            return self._reject(claim, exc)
        except Exception as exc:  # a parser bug: crashing would retry this payload forever (no jobId, no attempts)
            log.exception("could not read a payload")
            return self._reject(claim, JobRejected(f"internal error reading the payload: {type(exc).__name__}", claim.job_id))
        self.current_job = job.job_id
        try:
            with job_context(job.job_id):   # every log line of this job carries its jobId
                self._guarded(claim, job, lambda: self._run(claim, job))
        finally:
            self.current_job = None

    def _guarded(self, claim: Claim, job: Job, step: Callable[[], None]) -> None:
        """Run `step` (`_run`, or `_finish` on the finisher's thread), with one branch per error class."""
        try:
            step()
        except JobRejected as exc:
            self._fail(claim, job.job_id, exc.reason)
        except ValueError as exc:                 # check_inputs-style refusal from a family
            self._fail(claim, job.job_id, str(exc))
        except ModelUnavailable as exc:
            self._fail_or_fall_back(claim, job, str(exc))
        except GenerationOutOfMemory as exc:
            if self.oom_streak:     # out of memory again, after the last failure freed it: model-side
                self._fail_or_fall_back(claim, job, str(exc))
            else:
                self._fail(claim, job.job_id, str(exc))
            self._out_of_memory()
        except JobTimedOut:
            self._fail(claim, job.job_id, f"timed out after {job.spec.timeout_seconds:.0f}s")
        except JobInterrupted:
            log.info("job %s given back to %s (shutdown)", job.job_id, self.queue.queue)
            self.queue.requeue(claim, count_attempt=False)
            self.records.update(job.job_id, status="queued", phase="requeued")
        except StorageError as exc:
            self._storage_failed(claim, job, exc)
        except redis.RedisError:
            raise                                  # the job stays claimed; recovered and run again
        except Exception as exc:                   # a bug: fail this job, keep the worker alive
            log.exception("job %s failed unexpectedly", job.job_id)
            self._fail(claim, job.job_id, f"internal error: {type(exc).__name__}: {exc}"[:500])

    def _run(self, claim: Claim, job: Job) -> None:
        if self.records.status(job.job_id) == "completed":
            log.info("job %s already completed; acknowledging the repeat", job.job_id)
            return self.queue.ack(claim)
        if claim.attempts > job.spec.max_attempts:
            return self._give_up(claim, job.job_id, claim.attempts - 1)
        family = self._family_for(job)
        started = self.clock()
        self.records.update(job.job_id, status="processing", jobType=job.job_type, userId=job.user_id,
                            queue=self.queue.queue, worker=self.queue.worker_id, phase="checking",
                            step=0, steps=job.steps, started_at=started)
        self.outbox.send_progress(processing_body(job.job_id))
        family.check(job)

        deadline = started + job.spec.timeout_seconds
        self.records.update(job.job_id, phase="generating")
        output = family.generate(job, self._progress(job, deadline))
        self.oom_streak = 0       # generation succeeded (counted here, on the loop's thread)
        if self.finisher is None:
            return self._finish(claim, job, output, started)
        # Encoding, upload and callback overlap the next job's generation (at most one job finishing).
        self.finishing = claim      # before submit: its wait for the previous job must not see this one cleared
        self.finisher.submit(lambda: self._finish_in_background(claim, job, output, started))

    def _finish_in_background(self, claim: Claim, job: Job, output, started: float) -> None:
        with job_context(job.job_id):
            try:
                self._guarded(claim, job, lambda: self._finish(claim, job, output, started))
            except redis.RedisError as exc:   # unless its end was committed, still claimed: requeued, run again
                log.warning("job %s: redis failed while finishing (%s); unless it was recorded as ended, it runs "
                            "again", job.job_id, exc)
            finally:
                if self.finishing is claim:   # a claim no longer being finished is the next maintenance's to requeue
                    self.finishing = None

    def _finish(self, claim: Claim, job: Job, output, started: float) -> None:
        """Store the outputs, then completed and acked in one transaction, then the callback."""
        paths = self._store(job, output)
        body = completed_body(job.job_id, paths, job.spec.content)   # video: filePath is the MP4
        if job.spec.content == "video":
            body["thumbnailPath"] = paths[1]
        body["seeds"] = list(job.seeds)
        body["bucket"] = job.bucket
        note = fallback_note(job.payload)
        if note is not None:
            body["fallback"] = note
        self.outbox.send_terminal(job.job_id, body, same_transaction=self._ending(
            claim, job.job_id, status="completed", phase="done", outputs=paths, seeds=list(job.seeds),
            bucket=job.bucket, completed_at=self.clock(), seconds=round(self.clock() - started, 3)))
        count_job(self.queue.r, job.job_type, "completed")
        observe_duration(self.queue.r, job.job_type, self.clock() - started)
        log.info("job %s completed: %d output(s) in %.2fs", job.job_id, len(paths), self.clock() - started)

    def _family_for(self, job: Job):
        family = self.families.get(job.spec.model)
        if family is None:
            why = self.load_errors.get(job.spec.model) or f"model {job.spec.model!r} is not served by this worker"
            raise ModelUnavailable(f"{job.job_type} cannot run on this pod: {why}")
        return family

    def _progress(self, job: Job, deadline: float):
        last_write = 0.0

        def on_step(step: int, total: int) -> None:
            nonlocal last_write
            faults.during_generation(job.payload)   # no-op unless FAULT_INJECTION is on (tests)
            now = self.clock()
            if self.stop.now.is_set():
                raise JobInterrupted()
            if now > deadline:
                raise JobTimedOut()
            if step == total or now - last_write >= PROGRESS_INTERVAL:
                last_write = now
                self.records.update(job.job_id, step=step, steps=total, progress=round(step / total, 3))

        def phase(name: str) -> None:
            self.records.update(job.job_id, phase=name)

        on_step.phase = phase   # families with several stages record them ("encoding prompt", "decoding")
        on_step.record = lambda **fields: self.records.update(job.job_id, **fields)   # e.g. residency, swap_ms
        return on_step

    def _store(self, job: Job, output) -> list[str]:
        # Object names depend only on the job (and index): a second run overwrites, never duplicates.
        if job.spec.content == "video":
            return self._store_video(job, output)
        self.records.update(job.job_id, phase="uploading")
        images = output
        paths = []
        for index, data in enumerate(media.encode_pngs(images)):  # encoded in parallel threads
            name = object_name(job.job_id, index, "png")
            paths.append(self.storage.upload(job.bucket, job.user_id, name, data, job.spec.content_type))
        return paths

    def _store_video(self, job: Job, clip: media.VideoClip) -> list[str]:
        """`{jobId}.mp4` (H.264) and `{jobId}_thumb.jpg` (its first frame), in that order."""
        self.records.update(job.job_id, phase="encoding video")
        video, thumbnail = media.encode_mp4(clip.frames, clip.fps), media.encode_jpeg(clip.frames[0])
        self.records.update(job.job_id, phase="uploading")
        return [self.storage.upload(job.bucket, job.user_id, f"{job.job_id}.mp4", video, job.spec.content_type),
                self.storage.upload(job.bucket, job.user_id, f"{job.job_id}_thumb.jpg", thumbnail, "image/jpeg")]

    def _ending(self, claim: Claim, job_id: str, dead_letter: str | None = None, **record) -> Callable:
        """The writes that end a job, for send_terminal's transaction: the record, and the claim
        released (acked, or dead-lettered with its reason). A crash then leaves either a claimed job
        (run again) or an ended one whose callback waits in the outbox, never an ended job still claimed."""
        def writes(pipe) -> None:
            self.records.update(job_id, pipe=pipe, **record)
            if dead_letter is None:
                self.queue.ack(claim, pipe)
            else:
                self.queue.dead_letter(claim, dead_letter, pipe)
        return writes

    # --- failure branches -----------------------------------------------------------------
    def _reject(self, claim: Claim, exc: JobRejected) -> None:
        job_id = exc.job_id or claim.job_id   # the claim read the jobId of a payload refused unread (too large)
        if job_id is None:
            log.warning("dead-lettering a payload without a usable jobId: %s", exc.reason)
            return self.queue.dead_letter(claim, exc.reason)
        self._fail(claim, job_id, exc.reason)

    def _fail(self, claim: Claim, job_id: str, message: str) -> None:
        log.warning("job %s failed: %s", job_id, message)
        self.outbox.send_terminal(job_id, failed_body(job_id, message), same_transaction=self._ending(
            claim, job_id, status="failed", phase="done", error=message, completed_at=self.clock()))
        count_job(self.queue.r, job_type_label(claim.raw, self.catalog), "failed")

    def _fail_or_fall_back(self, claim: Claim, job: Job, reason: str) -> None:
        if self.settings.fallback_routing and reroute_claim(self.queue, self.records, self.catalog, claim, job.payload, reason):
            count_job(self.queue.r, job.job_type, "fell_back")
            return
        self._fail(claim, job.job_id, reason)

    def _give_up(self, claim: Claim, job_id: str, tried: int) -> None:
        message = f"gave up after {tried} attempt(s): the worker stopped while running this job each time"
        self.outbox.send_terminal(job_id, failed_body(job_id, message), same_transaction=self._ending(
            claim, job_id, dead_letter=message, status="failed", phase="done", error=message, completed_at=self.clock()))
        count_job(self.queue.r, job_type_label(claim.raw, self.catalog), "failed")

    def _out_of_memory(self) -> None:
        # Freed caches normally let the next job run; OOM after OOM means the device stays wedged
        # (fragmentation, a leak): exit, and the supervisor starts a fresh process.
        self.oom_streak += 1
        if self.oom_streak >= OOM_RESTART_AFTER:
            log.error("%d out-of-memory failures in a row: exiting so that a fresh process takes over", self.oom_streak)
            self.exit_code = EX_TEMPFAIL
            self.stop.graceful.set()

    def _storage_failed(self, claim: Claim, job: Job, exc: StorageError) -> None:
        if exc.retryable and claim.attempts < job.spec.max_attempts:
            log.warning("job %s: storage unavailable (%s); requeued for attempt %d", job.job_id, exc, claim.attempts + 1)
            self.records.update(job.job_id, status="queued", phase="storage retry", error=str(exc))
            return self.queue.requeue(claim, count_attempt=True)
        self._fail(claim, job.job_id, f"could not store the outputs: {exc}")
