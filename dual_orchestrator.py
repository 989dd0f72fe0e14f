#!/usr/bin/env python3
"""The daemon's entry point and operator CLI.

    python dual_orchestrator.py run                 supervise the image and video workers
    python dual_orchestrator.py submit TYPE PROMPT  push a job (CONTRACT.md payload) and optionally --wait
    python dual_orchestrator.py status JOB_ID       a job's status, progress and outputs (--watch)
    python dual_orchestrator.py queues              queue lengths, dead letters, workers
    python dual_orchestrator.py check               the start-up environment check alone
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from workers.config import ConfigError, Settings, load_catalog

log = logging.getLogger("orchestrator")
LOCAL_USER = "00000000-0000-4000-8000-000000000001"  # the CLI's default userId (a storage folder)
TERMINAL = ("completed", "failed")


def cmd_run(args) -> int:
    from workers.embedded_redis import EmbeddedRedis
    from workers.env_check import check_environment, fatal, format_findings
    from workers.preload import PreloadedSpawner
    from workers.queue import daemon_worker_id
    from workers.supervisor import ProcessSpec, Supervisor, popen_spawn
    from workers.worker_process import setup_logging

    setup_logging("orchestrator")
    settings, catalog = _load()
    findings = check_environment(settings)
    print(format_findings(findings), flush=True)
    if fatal(findings):
        return 1
    embedded = None
    env = dict(os.environ)
    if settings.embedded_redis:
        embedded = EmbeddedRedis(settings.embedded_redis_port, settings.data_dir / "redis")
        embedded.start()
        env["REDIS_URL"] = embedded.url
    env["DATA_DIR"] = str(settings.data_dir)
    mode = "local storage in " + str(settings.storage_dir) if settings.local_mode else "Supabase " + str(settings.supabase_url)
    log.info("outputs: %s; queues: %s", mode, ", ".join(w.queue for w in catalog.workers.values()))

    repo = Path(__file__).resolve().parent
    specs = [ProcessSpec(name=name, argv=[sys.executable, "-m", f"workers.{name}_worker"],
                         env={**env, "PYTHONPATH": str(repo), "WORKER_ID": daemon_worker_id(name, env)})
             for name in args.workers]
    gateway = _gateway_spec(settings, {**env, "PYTHONPATH": str(repo)})
    if gateway is not None:
        specs.append(gateway)
    # Workers fork from a server that imported the stack once: a restart skips the imports.
    spawn = popen_spawn
    if settings.preload_workers:
        spawn = PreloadedSpawner()
        log.info("worker imports done once in %.1fs (preloaded fork server)", spawn.warm())
    supervisor = Supervisor(specs, run_dir=settings.data_dir / "run", spawn=spawn)
    stop = threading.Event()
    redis_url = env["REDIS_URL"] if embedded else settings.redis_url
    _publish_status(supervisor, settings, catalog, redis_url, stop, embedded)
    from workers.metrics import serve

    http = serve(settings.health_host, settings.health_port, supervisor.status, redis_url, catalog)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        # Workers finish their job for up to STOP_GRACE s, then give it back; leave them time for that.
        supervisor.run_forever(stop, grace=float(os.environ.get("STOP_GRACE", "30")) + 15)
    finally:
        if http is not None:
            http.shutdown()
        if embedded:
            embedded.stop()
    return 0


def _gateway_spec(settings, env: dict):
    """The RYLA gateway (gateway/) as a third supervised process, when GATEWAY_ENABLED=1."""
    from gateway.settings import TRUE, GatewaySettings
    from workers.supervisor import ProcessSpec

    if (env.get("GATEWAY_ENABLED") or "").lower() not in TRUE:   # its settings matter only when it runs
        return None
    try:
        gateway = GatewaySettings.from_env(env, settings)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        sys.exit(78)
    log.info("RYLA gateway on http://%s:%d", gateway.host, gateway.port)
    return ProcessSpec(name="gateway", argv=[sys.executable, "-m", "gateway"], env=env, ready_timeout=120)


def _publish_status(supervisor, settings, catalog, redis_url: str, stop: threading.Event, embedded=None) -> None:
    """Every 2 s, the supervisor's view (states, restarts, exit codes) for `queues` and health checks;
    also restarts the embedded redis-server if it died, and empties the queue of a worker given up
    for good (its jobs run as their fallback or fail with the reason: workers/fallback.py)."""
    import socket

    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from workers.fallback import StrandedJobRescuer

    key = f"orchestrator:{socket.gethostname()}"

    def loop() -> None:
        # No retries: a stalled write here would also delay restarting a dead embedded redis-server.
        client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
        rescuer = StrandedJobRescuer(client, catalog, settings)
        while not stop.is_set():
            try:
                if embedded is not None:
                    embedded.ensure_running()
                statuses = supervisor.status()
                client.set(key, json.dumps(statuses), ex=10)
                rescuer.check(statuses)
            except redis.RedisError as exc:
                log.warning("could not publish the supervisor status: %s", exc)
            except Exception:   # this thread also restarts Redis and rescues queues: it must outlive any bug
                log.exception("status pass failed")
            stop.wait(2.0)

    threading.Thread(target=loop, name="status", daemon=True).start()


def cmd_submit(args) -> int:
    settings, catalog = _load()
    spec = catalog.job_type(args.job_type)
    if spec is None:
        print(f"unknown job type {args.job_type!r}; known: {', '.join(catalog.job_types)}", file=sys.stderr)
        return 2
    from workers.submit import enqueue, new_payload

    payload = new_payload(catalog, args.job_type, args.prompt, args.user, num_images=args.num_images, bucket=args.bucket,
                          seed=args.seed, initImage=_as_image_source(args.init_image) if args.init_image else None,
                          referenceImages=[_as_image_source(v) for v in args.reference_image] if args.reference_image else None,
                          maskImage=_as_image_source(args.mask_image) if args.mask_image else None,
                          loras=[_lora(v) for v in args.lora] if args.lora else None)
    client = _redis(settings)
    enqueue(client, catalog, payload)
    print(payload["jobId"], flush=True)
    return _watch(client, payload["jobId"], settings) if args.wait else 0


def _lora(value: str) -> dict:
    name, _, weight = value.partition(":")
    return {"name": name, "weight": float(weight) if weight else 1.0}


def cmd_status(args) -> int:
    settings, _ = _load()
    client = _redis(settings)
    if args.watch:
        return _watch(client, args.job_id, settings)
    from workers.queue import JobRecords

    record = JobRecords(client).get(args.job_id)
    if not record:
        print(f"no record of job {args.job_id}", file=sys.stderr)
        return 1
    print(json.dumps(record, indent=2))
    return 0


def cmd_queues(args) -> int:
    settings, catalog = _load()
    client = _redis(settings)
    from workers.queue import queue_overview

    report = [queue_overview(client, w.queue) for w in catalog.workers.values()]
    for worker in catalog.workers.values():
        for legacy in worker.legacy_queues:
            report.append({"queue": legacy, "pending": client.llen(legacy), "drained_into": worker.queue})
    for key in client.scan_iter("orchestrator:*"):
        report.append({"orchestrator": key.decode().split(":", 1)[1], "processes": json.loads(client.get(key) or "{}")})
    report.append({"callbacks_pending": client.zcard("callbacks:due"), "callbacks_dead": client.llen("callbacks:dead")})
    print(json.dumps(report, indent=2))
    return 0


def cmd_check(args) -> int:
    from workers.env_check import check_environment, fatal, format_findings

    settings, _ = _load()
    findings = check_environment(settings)
    print(format_findings(findings))
    return 1 if fatal(findings) else 0


def _watch(client, job_id: str, settings, poll: float = 0.2) -> int:
    """Print each change of status/phase/step until the job is terminal."""
    from workers.queue import JobRecords

    records, last = JobRecords(client), None
    deadline = time.monotonic() + float(os.environ.get("WATCH_TIMEOUT", "3600"))
    while time.monotonic() < deadline:
        record = records.get(job_id)
        view = (record.get("status"), record.get("phase"), record.get("step"), record.get("steps"))
        if view != last:
            last = view
            step = f" step {view[2]}/{view[3]}" if view[2] not in (None, "0") else ""
            model = f" (model {record['residency']}, {record.get('swap_ms')} ms)" if record.get("residency") else ""
            print(f"{job_id} {view[0] or 'unknown'} {view[1] or ''}{step}".rstrip() + model, flush=True)
        if record.get("status") in TERMINAL:
            if record["status"] == "failed":
                print(f"error: {record.get('error')}", flush=True)
                return 1
            for path in record.get("outputs", []):
                where = settings.storage_dir / record.get("bucket", "") / path if settings.local_mode else f"{record.get('bucket')}/{path}"
                print(where, flush=True)
            return 0
        time.sleep(poll)
    print("gave up waiting", file=sys.stderr)
    return 1


def _as_image_source(value: str) -> str:
    if value.startswith(("http://", "https://", "data:")):
        return value
    import base64
    import mimetypes

    mime = mimetypes.guess_type(value)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(Path(value).read_bytes()).decode()


def _load():
    try:
        settings = Settings.from_env()
        return settings, load_catalog(settings.job_types_file)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        sys.exit(78)


def _redis(settings):
    from workers.queue import connect

    return connect(settings.redis_url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dual_orchestrator.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="supervise the workers (the daemon)")
    run.add_argument("--workers", nargs="+", default=["image", "video"], choices=["image", "video"])
    run.set_defaults(func=cmd_run)
    submit = sub.add_parser("submit", help="push a job onto its queue")
    submit.add_argument("job_type")
    submit.add_argument("prompt")
    submit.add_argument("--user", default=LOCAL_USER, help="userId (storage folder)")
    submit.add_argument("--num-images", type=int)
    submit.add_argument("--seed", type=int)
    submit.add_argument("--bucket")
    submit.add_argument("--init-image", help="img2img source or image-to-video first frame: a file, an http(s) URL or a data: URI")
    submit.add_argument("--reference-image", action="append",
                        help="reference-to-video: a picture of the character (repeat for up to 3)")
    submit.add_argument("--mask-image", help="inpainting mask (white: repaint): a file, an http(s) URL or a data: URI")
    submit.add_argument("--lora", action="append", metavar="NAME[:WEIGHT]",
                        help="a LoRA file in LORAS_DIR (without .safetensors), weight 1 by default; repeatable")
    submit.add_argument("--wait", action="store_true", help="follow progress until the job ends")
    submit.set_defaults(func=cmd_submit)
    status = sub.add_parser("status", help="show a job's status")
    status.add_argument("job_id")
    status.add_argument("--watch", action="store_true")
    status.set_defaults(func=cmd_status)
    sub.add_parser("queues", help="show queues and workers").set_defaults(func=cmd_queues)
    sub.add_parser("check", help="run the environment check").set_defaults(func=cmd_check)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
