"""Out of memory and poison jobs, through workers/faults.py (FAULT_INJECTION=1 and a payload marker)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from tests.reliability import Config
from tests.reliability.daemon import Daemon, payload
from tests.reliability.figures import Figures, settle_local, tally_local
from tests.reliability.scenarios import _check_end_state
from workers.faults import MARKER
from workers.runner import EX_TEMPFAIL, OOM_RESTART_AFTER

OOM_REASON = "out of GPU memory"


def out_of_memory(cfg: Config, root: Path, tiny) -> list[Figures]:
    fig = Figures("out of memory", cfg.name)
    # Fallback off: this scenario checks the OOM failure itself (a repeated OOM would otherwise
    # send the job to its fallback; the fallback scenario covers that).
    daemon = Daemon(root, tiny, steps=1, FAULT_INJECTION=1, FALLBACK_ROUTING=0).start()
    try:
        started = time.monotonic()
        first_pid = daemon.worker_pid("image")
        # One OOM: that job fails with a clear message, the same process completes the next job.
        once = [payload(**{MARKER: "oom"}), payload()]
        for body in once:
            daemon.push(body)
        settle_local(fig, daemon, [b["jobId"] for b in once], cfg.settle_seconds)
        fig.require(daemon.worker_pid("image") == first_pid, "the image worker was restarted after a single OOM")
        # OOM after OOM: the worker exits (EX_TEMPFAIL), the orchestrator restarts it, the next job completes.
        streak = [payload(**{MARKER: "oom"}) for _ in range(OOM_RESTART_AFTER)] + [payload()]
        for body in streak:
            daemon.push(body)
        jobs = once + streak
        ids = [b["jobId"] for b in jobs]
        settle_local(fig, daemon, ids, cfg.settle_seconds)
        fig.seconds = time.monotonic() - started
        report = _check_end_state(fig, daemon)
        tally_local(fig, daemon, ids)
        image = report.get("processes", {}).get("image", {})
        fig.notes["image worker"] = (f"pid {first_pid} → {image.get('pid')}, restarts {image.get('restarts')}, "
                                     f"last exit code {image.get('last_exit')}")
        fig.require(image.get("restarts") == 1 and image.get("last_exit") == EX_TEMPFAIL,
                    f"expected one restart after exit code {EX_TEMPFAIL}: {image}")
        fig.require(fig.completed == 2, f"{fig.completed} ordinary job(s) completed, expected 2")
        fig.require(all(OOM_REASON in kind for kind in fig.failed), f"unclear OOM failures: {list(fig.failed)}")
    finally:
        daemon.stop()
    return [fig]


def poison(cfg: Config, root: Path, tiny) -> list[Figures]:
    fig = Figures("poison jobs", cfg.name)
    daemon = Daemon(root, tiny, steps=1, FAULT_INJECTION=1).start()
    try:
        started = time.monotonic()
        bad = [payload(**{MARKER: "crash"}) for _ in range(cfg.poison_jobs)]
        good = [payload() for _ in range(4)]
        for body in bad + good:
            daemon.push(body)
        ids = [b["jobId"] for b in bad + good]
        settle_local(fig, daemon, ids, cfg.settle_seconds)
        fig.seconds = time.monotonic() - started
        report = _check_end_state(fig, daemon)
        tally_local(fig, daemon, ids)
        dead = {json.loads(d).get("jobId") for d in daemon.client.lrange("sdxl_queue:dead", 0, -1)}
        attempts = [int(daemon.client.hget(f"job:{b['jobId']}", "attempts") or 0) for b in bad]
        image = report.get("processes", {}).get("image", {})
        fig.notes["dead letters"] = f"{len(dead & {b['jobId'] for b in bad})} of {len(bad)} poison jobs"
        fig.notes["image worker"] = f"{image.get('restarts')} restarts, state {image.get('state')}"
        fig.notes["claims per poison job"] = attempts
        fig.require(all(b["jobId"] in dead for b in bad), "a poison job is not in sdxl_queue:dead")
        fig.require(fig.completed == len(good), f"{len(good) - fig.completed} ordinary job(s) did not complete")
        fig.require(all("gave up after 3 attempt(s)" in kind for kind in fig.failed), f"reasons: {list(fig.failed)}")
        fig.require(image.get("restarts") == 3 * len(bad), f"expected {3 * len(bad)} restarts: {image}")
    finally:
        daemon.stop()
    return [fig]
