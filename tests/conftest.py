"""Shared fixtures: a real redis-server per test session (flushed per test), settings for tests."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A real redis-server on a free loopback port, data in a temp dir."""

    def __init__(self, data_dir: Path, appendonly: bool = False, extra_args: tuple[str, ...] = ()):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        self.port = free_port()
        self.data_dir = data_dir
        self.argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(data_dir),
                     "--save", "", "--appendonly", "yes" if appendonly else "no", "--daemonize", "no",
                     *extra_args]
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


from tests.fixtures.tiny_sdxl import tiny_sdxl  # noqa: E402,F401  (session fixture: tiny random SDXL on disk)
from tests.fixtures.tiny_wan import tiny_wan  # noqa: E402,F401  (session fixture: tiny random Wan T2V/I2V/VACE)
from tests.fixtures.tiny_image_models import tiny_image_models  # noqa: E402,F401  (tiny Qwen-Image, Z-Image, LoRAs)
