"""The gateway process: `python -m gateway` (the orchestrator starts it when GATEWAY_ENABLED=1).

It binds GATEWAY_HOST:GATEWAY_PORT, serves with uvicorn, and reports ready to its supervisor (the
workers' ready protocol, workers/supervisor.py) once the socket accepts requests. Exit code 78: the
configuration is wrong (not restarted).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys

import redis.asyncio
import uvicorn

from gateway.app import create_app
from gateway.settings import GatewaySettings, detect_gpu_type
from storage import make_storage
from workers.config import ConfigError, Settings, load_catalog
from workers.supervisor import EX_CONFIG, report_ready
from workers.worker_process import setup_logging

log = logging.getLogger("gateway")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class GatewayServer(uvicorn.Server):
    """uvicorn's server, exiting 0 on SIGTERM/SIGINT: its own handler re-raises the signal once shut
    down, and the supervisor would then record a crash (exit -15) for an ordinary stop."""

    @contextlib.contextmanager
    def capture_signals(self):
        def stop(*_):
            self.should_exit = True

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


async def serve(server: uvicorn.Server, sock: socket.socket) -> None:
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        report_ready()
        log.info("gateway ready on http://%s:%d", *sock.getsockname()[:2])
    await task


def main() -> int:
    setup_logging("gateway")
    try:
        settings = Settings.from_env()
        catalog = load_catalog(settings.job_types_file)
        gateway = GatewaySettings.from_env(settings=settings)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return EX_CONFIG
    client = redis.asyncio.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_keepalive=True,
                                          health_check_interval=15)
    app = create_app(catalog, gateway, client, make_storage(settings), gateway.gpu_type or detect_gpu_type())
    sock = bind(gateway.host, gateway.port)
    # In-flight requests get a few seconds on SIGTERM; their jobs stay queued and their result URLs serve them.
    config = uvicorn.Config(app, log_level=os.environ.get("LOG_LEVEL", "INFO").lower(), access_log=False,
                            timeout_graceful_shutdown=5, lifespan="off")
    asyncio.run(serve(GatewayServer(config), sock))
    return 0


if __name__ == "__main__":
    sys.exit(main())
