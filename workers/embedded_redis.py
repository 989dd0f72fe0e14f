"""The embedded default: a local redis-server on loopback, data (AOF) under DATA_DIR/redis."""
from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path

import redis

log = logging.getLogger("orchestrator.redis")


class EmbeddedRedis:
    def __init__(self, port: int, data_dir: Path):
        self.port = port
        self.data_dir = data_dir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _ping(self) -> bool:
        try:
            return bool(redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def start(self, timeout: float = 15.0) -> None:
        if self._ping():
            log.warning("a Redis already answers on 127.0.0.1:%d; using it", self.port)
            return
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: apt-get install -y redis-server (or set REDIS_URL)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--protected-mode", "yes",
                "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "everysec",
                "--save", "", "--daemonize", "no"]
        log_file = open(self.data_dir / "redis.log", "ab")
        self.proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self._ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"embedded redis-server did not start; see {self.data_dir / 'redis.log'}")
            time.sleep(0.05)
        log.info("embedded redis-server on %s (data in %s)", self.url, self.data_dir)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
