"""Health and Prometheus metrics of the daemon, served by the orchestrator over plain HTTP (stdlib).

    GET /health    JSON: each process's supervisor state, each worker's heartbeat (alive, current
                   job, models), queue lengths, callbacks. 200 when every process is running, Redis
                   answers and each queue has a live worker; 503 otherwise.
    GET /metrics   Prometheus text format (below).

Loopback only by default (HEALTH_HOST=127.0.0.1, HEALTH_PORT=9464; HEALTH_PORT=0 turns it off).
Job counters live in Redis (hash `metrics:jobs`, field "{jobType}|{status}"), incremented by every
worker's runner when a job reaches a terminal status, so they survive worker and daemon restarts.
"""
from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from workers.queue import queue_overview

JOBS_KEY = "metrics:jobs"
PREFIX = "ourvidz"
log = logging.getLogger("orchestrator.http")


# --- counters, written by the runner ------------------------------------------------------------
def job_type_label(raw: bytes | str | None, catalog) -> str:
    """The payload's jobType when the catalog knows it, else "unknown" (keeps label values bounded)."""
    try:
        value = json.loads(raw).get("jobType")
    except (ValueError, AttributeError, TypeError, RecursionError):
        return "unknown"
    return value if isinstance(value, str) and catalog.job_type(value) is not None else "unknown"


def count_job(client: redis.Redis, job_type: str, status: str) -> None:
    """One more job of `job_type` ended `status`. Best effort: a metric never fails a job."""
    try:
        client.hincrby(JOBS_KEY, f"{job_type}|{status}", 1)
    except redis.RedisError as exc:
        log.warning("could not count a %s %s job: %s", status, job_type, exc)


# --- views --------------------------------------------------------------------------------------
def _queues(catalog) -> list[tuple[str, str]]:
    """(process name, queue) for each worker, then its legacy queues."""
    pairs = [(name, spec.queue) for name, spec in catalog.workers.items()]
    return pairs + [(name, legacy) for name, spec in catalog.workers.items() for legacy in spec.legacy_queues]


def health(processes: dict, client: redis.Redis, catalog) -> tuple[int, dict]:
    report = {"processes": processes, "workers": {}, "queues": {}, "callbacks": {}, "redis": "ok"}
    ok = all(p.get("state") == "running" for p in processes.values())
    try:
        for name, spec in catalog.workers.items():
            if name not in processes:
                continue
            view = queue_overview(client, spec.queue)
            report["workers"][name] = view["workers"]
            report["queues"][spec.queue] = {k: view[k] for k in ("pending", "processing", "dead")}
            ok = ok and any(w["alive"] for w in view["workers"])
            for legacy in spec.legacy_queues:
                report["queues"][legacy] = {"pending": client.llen(legacy)}
        report["callbacks"] = {"pending": client.zcard("callbacks:due"), "dead": client.llen("callbacks:dead")}
    except redis.RedisError as exc:
        report["redis"] = f"unreachable: {type(exc).__name__}"
        ok = False
    report["ok"] = ok
    return (200 if ok else 503), report


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Text:
    def __init__(self):
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
        self.lines += [f"# HELP {PREFIX}_{name} {help_text}", f"# TYPE {PREFIX}_{name} {kind}"]
        for labels, value in samples:
            inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            number = int(value) if float(value).is_integer() else float(value)
            self.lines.append(f"{PREFIX}_{name}{{{inner}}} {number}" if inner else f"{PREFIX}_{name} {number}")


def render_metrics(processes: dict, client: redis.Redis, catalog) -> str:
    out = _Text()
    out.family("process_up", "gauge", "1 when the supervised process is running (ready).",
               [({"process": n}, float(p.get("state") == "running")) for n, p in sorted(processes.items())])
    out.family("process_restarts_total", "counter", "Restarts of the supervised process by the orchestrator.",
               [({"process": n}, p.get("restarts", 0)) for n, p in sorted(processes.items())])
    try:
        counts = {k.decode(): int(v) for k, v in client.hgetall(JOBS_KEY).items()}
        jobs = []
        for field, value in sorted(counts.items()):
            job_type, _, status = field.partition("|")
            jobs.append(({"job_type": job_type, "status": status}, value))
        out.family("jobs_total", "counter", "Jobs that reached a terminal status, by job type and status.", jobs)
        pending, processing, dead, alive = [], [], [], []
        for name, queue in _queues(catalog):
            if name not in processes:
                continue
            view = queue_overview(client, queue)
            pending.append(({"queue": queue}, view["pending"]))
            processing.append(({"queue": queue}, view["processing"]))
            dead.append(({"queue": queue}, view["dead"]))
            alive += [({"queue": queue, "worker": w["id"]}, float(w["alive"])) for w in view["workers"]]
        out.family("queue_pending", "gauge", "Jobs waiting in the queue.", pending)
        out.family("queue_processing", "gauge", "Jobs claimed by a worker, not yet acknowledged.", processing)
        out.family("dead_letters", "gauge", "Entries in the queue's dead-letter list.", dead)
        out.family("worker_alive", "gauge", "1 while the worker's heartbeat is fresh.", alive)
        out.family("callbacks_pending", "gauge", "Terminal callbacks in the outbox, not yet delivered.",
                   [({}, client.hlen("callbacks:pending"))])
        out.family("callbacks_dead", "gauge", "Callbacks the receiver refused for good.", [({}, client.llen("callbacks:dead"))])
        out.family("redis_up", "gauge", "1 when Redis answered this scrape.", [({}, 1)])
    except redis.RedisError:
        out.family("redis_up", "gauge", "1 when Redis answered this scrape.", [({}, 0)])
    return "\n".join(out.lines) + "\n"


# --- the server ---------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    processes: Callable[[], dict]
    client: redis.Redis
    catalog: object

    def log_message(self, format, *args) -> None:  # scrapes every few seconds would flood the log
        pass

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            status, report = health(self.processes(), self.client, self.catalog)
            body, content_type = json.dumps(report, indent=1).encode(), "application/json"
        elif path == "/metrics":
            status = 200
            body = render_metrics(self.processes(), self.client, self.catalog).encode()
            content_type = "text/plain; version=0.0.4; charset=utf-8"
        else:
            status, body, content_type = 404, b'{"error": "try /health or /metrics"}', "application/json"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve(host: str, port: int, processes: Callable[[], dict], redis_url: str, catalog) -> ThreadingHTTPServer | None:
    """Start the endpoint on a daemon thread; None when turned off (port 0) or the port is taken."""
    if not port:
        return None
    # Short timeouts and no retries: a health check must answer quickly, also while Redis is down.
    client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    handler = type("Handler", (_Handler,), {"processes": staticmethod(processes), "client": client, "catalog": catalog})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as exc:  # the daemon runs without the endpoint rather than not at all
        log.error("health/metrics endpoint not started on %s:%d: %s", host, port, exc)
        return None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log.info("health and metrics on http://%s:%d/health and /metrics", host, port)
    return server
