"""Health and Prometheus metrics of the daemon, served by the orchestrator over plain HTTP (stdlib).

    GET /health    JSON: each process's supervisor state, each worker's heartbeat (alive, current
                   job, models), queue lengths, callbacks. 200 when every process is running, Redis
                   answers and each queue has a live worker; 503 otherwise.
    GET /metrics   Prometheus text format, through prometheus-client (a collector reading Redis).

Loopback only by default (HEALTH_HOST=127.0.0.1, HEALTH_PORT=9464; HEALTH_PORT=0 turns it off).
Job counters and duration histograms live in Redis (hashes `metrics:jobs`, field "{jobType}|{status}",
and `metrics:durations`), written by every worker's runner when a job ends, so they survive worker
and daemon restarts and add up across workers. Each worker's heartbeat carries its VRAM in use.
"""
from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import redis
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from redis.backoff import NoBackoff
from redis.retry import Retry

from workers.queue import queue_overview

JOBS_KEY = "metrics:jobs"
DURATIONS_KEY = "metrics:durations"      # "{jobType}|{le}" cumulative counts, "{jobType}|sum"
DURATION_BUCKETS = (1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1200)   # seconds: SDXL images to long videos
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


def observe_duration(client: redis.Redis, job_type: str, seconds: float) -> None:
    """A completed job's duration into the cumulative histogram in Redis. Best effort, like count_job."""
    try:
        with client.pipeline(transaction=True) as pipe:
            for le in DURATION_BUCKETS:
                if seconds <= le:
                    pipe.hincrby(DURATIONS_KEY, f"{job_type}|{_bound(le)}", 1)
            pipe.hincrby(DURATIONS_KEY, f"{job_type}|+Inf", 1)
            pipe.hincrbyfloat(DURATIONS_KEY, f"{job_type}|sum", round(seconds, 3))
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("could not record a %s job's duration: %s", job_type, exc)


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


class DaemonCollector:
    """A prometheus-client collector that reads the supervisor's view and Redis at each scrape."""

    def __init__(self, processes: dict, client: redis.Redis, catalog):
        self.processes, self.client, self.catalog = processes, client, catalog

    def collect(self):
        processes = self.processes
        up = GaugeMetricFamily(f"{PREFIX}_process_up", "1 when the supervised process is running (ready).", labels=["process"])
        restarts = CounterMetricFamily(f"{PREFIX}_process_restarts", "Restarts of the supervised process by the orchestrator.",
                                       labels=["process"])
        for name, p in sorted(processes.items()):
            up.add_metric([name], float(p.get("state") == "running"))
            restarts.add_metric([name], p.get("restarts", 0))
        yield up
        yield restarts
        redis_up = GaugeMetricFamily(f"{PREFIX}_redis_up", "1 when Redis answered this scrape.")
        try:
            families = list(self._from_redis())
        except redis.RedisError:
            redis_up.add_metric([], 0)
            yield redis_up
            return
        yield from families
        redis_up.add_metric([], 1)
        yield redis_up

    def _from_redis(self):
        c = self.client
        jobs = CounterMetricFamily(f"{PREFIX}_jobs", "Jobs that reached a terminal status, by job type and status.",
                                   labels=["job_type", "status"])
        for key, value in sorted((k.decode(), int(v)) for k, v in c.hgetall(JOBS_KEY).items()):
            job_type, _, status = key.partition("|")
            jobs.add_metric([job_type, status], value)
        yield jobs
        yield self._durations()
        # queue_overview's field → its gauge
        gauges = {field: GaugeMetricFamily(f"{PREFIX}_{name}", text, labels=["queue"]) for field, name, text in (
            ("pending", "queue_pending", "Jobs waiting in the queue."),
            ("processing", "queue_processing", "Jobs claimed by a worker, not yet acknowledged."),
            ("dead", "dead_letters", "Entries in the queue's dead-letter list."))}
        alive = GaugeMetricFamily(f"{PREFIX}_worker_alive", "1 while the worker's heartbeat is fresh.", labels=["queue", "worker"])
        vram = GaugeMetricFamily(f"{PREFIX}_worker_vram_bytes", "GPU memory the worker's allocator holds (reserved).",
                                 labels=["queue", "worker"])
        for name, queue in _queues(self.catalog):
            if name not in self.processes:
                continue
            view = queue_overview(c, queue)
            for field, family in gauges.items():
                family.add_metric([queue], view[field])
            for w in view["workers"]:
                alive.add_metric([queue, w["id"]], float(w["alive"]))
                if w["alive"] and isinstance(w.get("vram_bytes"), int):
                    vram.add_metric([queue, w["id"]], w["vram_bytes"])
        yield from gauges.values()
        yield alive
        yield vram
        pending = GaugeMetricFamily(f"{PREFIX}_callbacks_pending", "Terminal callbacks in the outbox, not yet delivered.")
        pending.add_metric([], c.hlen("callbacks:pending"))
        dead = GaugeMetricFamily(f"{PREFIX}_callbacks_dead", "Callbacks the receiver refused for good.")
        dead.add_metric([], c.llen("callbacks:dead"))
        yield pending
        yield dead

    def _durations(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(f"{PREFIX}_job_seconds", "Seconds from start to completion of completed jobs.",
                                       labels=["job_type"])
        by_type: dict[str, dict[str, float]] = {}
        for key, value in self.client.hgetall(DURATIONS_KEY).items():
            job_type, _, field = key.decode().partition("|")
            by_type.setdefault(job_type, {})[field] = float(value)
        for job_type, fields in sorted(by_type.items()):
            buckets = [(_bound(le), fields.get(_bound(le), 0.0)) for le in DURATION_BUCKETS] + [("+Inf", fields.get("+Inf", 0.0))]
            family.add_metric([job_type], buckets, sum_value=fields.get("sum", 0.0))
        return family


def _bound(le: float) -> str:
    return f"{le:g}"


def render_metrics(processes: dict, client: redis.Redis, catalog) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(processes, client, catalog))
    return generate_latest(registry).decode()


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
            content_type = CONTENT_TYPE_LATEST
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
