"""The embedded default: a local redis-server on loopback, data (AOF) under DATA_DIR/redis."""
from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger("orchestrator.redis")


class EmbeddedRedis:
    def __init__(self, port: int, data_dir: Path):
        self.port = port
        self.data_dir = data_dir
        self.proc: subprocess.Popen | None = None
        self.stopped = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _ping(self) -> bool:
        try:
            # No retries (redis-py's default retries for seconds): "nothing listens" must answer at once.
            client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
            return bool(client.ping())
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
        with open(self.data_dir / "redis.log", "ab") as log_file:  # the child keeps its own copy
            self.proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self._ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"embedded redis-server did not start; see {self.data_dir / 'redis.log'}")
            time.sleep(0.05)
        log.info("embedded redis-server on %s (data in %s)", self.url, self.data_dir)

    def ensure_running(self) -> bool:
        """Start redis-server again (same port, same AOF data) if it exited; True when it did.
        Without this a redis-server that died (OOM killer, a crash) would stall the daemon for good."""
        if self.proc is None or self.proc.poll() is None or self.stopped:
            return False
        log.error("embedded redis-server exited with code %s; starting it again on port %d", self.proc.returncode, self.port)
        try:
            self.start()
        except (RuntimeError, OSError) as exc:  # tried again at the next call
            log.error("could not start redis-server again: %s", exc)
            return False
        return True

    def stop(self) -> None:
        self.stopped = True
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
