"""What every worker process does around its Runner: wiring, heartbeat, signals, ready report.

A worker entry (image_worker.py, video_worker.py) only says which models it loads; this module
builds the rest from settings and runs the loop until SIGTERM.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Callable

import redis

from storage import make_storage
from workers import faults
from workers.callback import CallbackOutbox, make_callback_sink
from workers.config import Catalog, ConfigError, Settings, load_catalog
from workers.logs import setup_logging  # noqa: F401  (also the entry of the orchestrator and the gateway)
from workers.queue import JobRecords, ReliableQueue, connect, default_worker_id
from workers.runner import Runner
from workers.supervisor import READY_ENV, report_ready

EX_CONFIG = 78  # the supervisor does not restart a worker whose configuration is wrong
log = logging.getLogger("workers")

# (catalog, settings, model keys) -> (loaded families by model key, load errors by model key)
ModelLoader = Callable[[Catalog, Settings, list[str]], tuple[dict, dict[str, str]]]


def use_expandable_segments(env=os.environ) -> None:
    """Before the process's first CUDA allocation: PyTorch's allocator grows mapped segments in place
    instead of caching many fixed-size ones, so less memory sits reserved but unused (H200: SDXL's peak
    reserved 11.6 GiB instead of 13.7, Wan's 24.8 instead of 25.7, both workers at once 37.9 instead of
    40.9). An operator's own PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF wins."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in env and "PYTORCH_ALLOC_CONF" not in env:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def run_worker(name: str, load_models: ModelLoader) -> int:
    setup_logging(name)
    use_expandable_segments()   # before anything allocates on the GPU
    try:
        settings = Settings.from_env()
        catalog = load_catalog(settings.job_types_file)
        faults.configure()
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return EX_CONFIG
    if faults.exits_at_start(name):
        log.error("fault injection: %s exits at start (%s)", name, faults.EXIT_AT_START_ENV)
        return EX_CONFIG
    spec = catalog.workers[name]
    client = connect(settings.redis_url, settings.claim_timeout)
    queue = ReliableQueue(client, spec.queue, default_worker_id(name), settings.heartbeat_ttl, tuple(spec.legacy_queues))
    try:
        recovered = _register(queue)
    except redis.AuthenticationError as exc:
        log.error("configuration error: Redis refused the credentials (REDIS_URL / UPSTASH_*): %s", exc)
        return EX_CONFIG
    if recovered:
        log.warning("took back %d job(s) claimed by this worker's previous process", recovered)

    model_keys = sorted({t.model for t in catalog.types_for_worker(name)})
    families, load_errors = load_models(catalog, settings, model_keys)
    for key, why in load_errors.items():
        log.error("model %s not loaded: %s", key, why)

    runner = Runner(catalog=catalog, settings=settings, queue=queue, records=JobRecords(client),
                    storage=make_storage(settings), outbox=CallbackOutbox(client, make_callback_sink(settings)),
                    families=families, load_errors=load_errors, worker_type=spec.worker_type)
    models_state = {key: ("loaded" if key in families else f"unavailable: {load_errors.get(key, '')}") for key in model_keys}
    if getattr(families, "residency", None) is not None:   # the image worker: resident / warm / not loaded, kept current
        families.residency.publish_to(models_state)
    beat = _start_heartbeat(queue, runner, models_state)
    _install_signal_handlers(runner, float(os.environ.get("STOP_GRACE", "30")))
    report_ready()
    log.info("%s worker ready on %s as %s (models: %s)", name, spec.queue, queue.worker_id, models_state)
    try:
        runner.serve()
    finally:
        beat.set()
        try:
            queue.deregister()
        except redis.RedisError as exc:
            log.warning("could not deregister (%s); the reaper will clean up", exc)
    log.info("%s worker stopped", name)
    return runner.exit_code


def _register(queue: ReliableQueue) -> int:
    """Join the queue's workers, waiting for Redis as long as it takes: a worker that crashed on an
    outage at start would count towards giving it up for good (five crashes before ready)."""
    delay = 1.0
    while True:
        try:
            return queue.register({"state": "loading"})
        except redis.AuthenticationError:   # a wrong password: configuration, not an outage
            raise
        except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError) as exc:
            log.warning("redis unreachable at start (%s); retrying in %.0fs", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


def _start_heartbeat(queue: ReliableQueue, runner: Runner, models: dict) -> threading.Event:
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            try:
                state = "busy" if runner.current_job else (f"compiling {runner.compiling}" if runner.compiling else "idle")
                queue.heartbeat({"state": state, "job": runner.current_job,
                                 "models": models, "vram_bytes": vram_in_use()})
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            except Exception:   # e.g. a CUDA fault reading the VRAM figure: keep beating, or peers reap live claims
                log.exception("heartbeat report failed")
            stop.wait(max(queue.heartbeat_ttl / 3, 0.05))

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()
    return stop


def vram_in_use() -> int | None:
    """Bytes the CUDA caching allocator holds, or None before CUDA is in use (never initialises it)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.memory_reserved())


def _install_signal_handlers(runner: Runner, grace: float) -> None:
    """First SIGTERM (or SIGINT, unsupervised): finish the current job (up to `grace` s), then exit.
    Second: give it back now."""

    def handler(signum, _frame) -> None:
        if runner.stop.graceful.is_set():
            runner.stop.now.set()
            return
        log.info("signal %d: finishing the current job (at most %.0fs), then stopping", signum, grace)
        runner.stop.graceful.set()
        timer = threading.Timer(grace, runner.stop.now.set)
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, handler)
    # Supervised, a terminal's Ctrl-C reaches the whole process group, and the orchestrator turns it
    # into a SIGTERM: counting both would make that SIGTERM the second signal (give the job back now).
    signal.signal(signal.SIGINT, signal.SIG_IGN if os.environ.get(READY_ENV) else handler)
