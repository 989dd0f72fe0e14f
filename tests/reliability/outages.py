"""Storage outage and callback outage: the Supabase stand-in answers 503, then hangs, then recovers."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

from tests.reliability import Config
from tests.reliability.daemon import Daemon, payload
from tests.reliability.figures import TERMINAL, Figures, standin_callbacks, statuses, tally, wait_settled
from tests.supabase_standin import CALLBACK_PATH, STORAGE_PREFIX, SupabaseStandin

SERVICE_KEY = "reliability-service-key-4f9c2a"
CALLBACK_SECRET = "reliability-callback-secret-8d1e7b"
HTTP_TIMEOUT = 1.5   # the workers' request timeout in this scenario
HANG = 4.0           # how long the stand-in holds a request during the hang phase (> HTTP_TIMEOUT)


class EarlyCompletionWatch:
    """Flags a job whose Redis record reads completed while one of its outputs is not stored yet.
    Objects are never deleted, so reading the record first and the objects second is sound."""

    def __init__(self, daemon: Daemon, cloud: SupabaseStandin, ids: list[str]):
        self.daemon, self.cloud, self.ids = daemon, cloud, ids
        self.early: set[str] = set()
        self.checked: set[str] = set()

    def __call__(self) -> bool:
        done = [j for j, s in statuses(self.daemon.client, self.ids).items() if s == "completed" and j not in self.checked]
        for job_id in done:
            record = self.daemon.client.hmget(f"job:{job_id}", "bucket", "outputs")
            bucket, outputs = record[0].decode(), json.loads(record[1])
            with self.cloud.lock:
                missing = [p for p in outputs if f"{bucket}/{p}" not in self.cloud.objects]
            if missing:
                self.early.add(job_id)
            self.checked.add(job_id)
        return True


def _watch_for(seconds: float, watch: EarlyCompletionWatch) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        watch()
        time.sleep(0.1)


def _outage(daemon: Daemon, cloud: SupabaseStandin, prefix: str, name: str, cfg: Config, rng: random.Random) -> Figures:
    fig = Figures(name, cfg.name)
    jobs = [payload(num_images=rng.choice((1, 2))) for _ in range(cfg.outage_jobs)]
    ids = [j["jobId"] for j in jobs]
    third = len(jobs) // 3
    watch = EarlyCompletionWatch(daemon, cloud, ids)
    started = time.monotonic()
    for body in jobs[:third]:
        daemon.push(body)
    cloud.fail_for(prefix, cfg.outage_seconds, 503)
    for body in jobs[third:2 * third]:
        daemon.push(body)
    _watch_for(cfg.outage_seconds, watch)
    cloud.hang_for(prefix, cfg.outage_seconds, HANG)
    for body in jobs[2 * third:]:
        daemon.push(body)
    _watch_for(cfg.outage_seconds, watch)
    recovered = {j for j, bodies in standin_callbacks(cloud).items() if any(b["status"] in TERMINAL for b in bodies)}
    fig.require(wait_settled(daemon.client, ids, cfg.settle_seconds, lambda: standin_callbacks(cloud), also=watch),
                "jobs or callbacks still open at the deadline")
    fig.seconds = time.monotonic() - started
    cloud.clear_faults()
    callbacks = standin_callbacks(cloud)
    tally(fig, ids, daemon.client, callbacks)
    late = [j for j in ids if j not in recovered]
    fig.notes["after recovery"] = f"{len(late)} job(s) had their terminal callback delivered after the outage"
    fig.notes["outage"] = f"{cfg.outage_seconds:g} s of HTTP 503, then {cfg.outage_seconds:g} s of requests held {HANG:g} s"
    fig.require(not watch.early, f"{len(watch.early)} job(s) marked completed before their outputs existed")
    early = [b["jobId"] for b in cloud.early_completions if b["jobId"] in set(ids)]
    fig.require(not early, f"{len(early)} completed callback(s) named outputs not stored yet")
    # An upload outage longer than the retry budget (5 uploads × max_attempts runs) fails a job, clearly.
    unexpected = [k for k in fig.failed if prefix != STORAGE_PREFIX or "could not store the outputs" not in k]
    fig.require(not unexpected, f"unexpected failures: {unexpected}")
    fig.require(fig.completed >= len(jobs) // 2, f"only {fig.completed} of {len(jobs)} job(s) completed")
    fig.require(late, "no callback was held back by the outage: the scenario did not test anything")
    return fig


def outages(cfg: Config, root: Path, tiny) -> list[Figures]:
    rng = random.Random(cfg.seed)
    with SupabaseStandin(service_key=SERVICE_KEY, callback_secret=CALLBACK_SECRET) as cloud:
        daemon = Daemon(root, tiny, steps=1, SUPABASE_URL=cloud.url, SUPABASE_SERVICE_KEY=SERVICE_KEY,
                        CALLBACK_SECRET=CALLBACK_SECRET, HTTP_TIMEOUT=HTTP_TIMEOUT).start()
        try:
            figures = [_outage(daemon, cloud, STORAGE_PREFIX, "storage outage", cfg, rng),
                       _outage(daemon, cloud, CALLBACK_PATH, "callback outage", cfg, rng)]
        finally:
            daemon.stop()
        log = daemon.log_tail(chars=50_000_000)
        leaked = [name for name, value in (("SUPABASE_SERVICE_KEY", SERVICE_KEY), ("CALLBACK_SECRET", CALLBACK_SECRET))
                  if value in log]
        figures[-1].notes["secrets in logs"] = ", ".join(leaked) or "none"
        figures[-1].require(not leaked, f"secrets in the daemon's log: {leaked}")
    return figures
