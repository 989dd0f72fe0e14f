"""The embedded redis-server comes back by itself, on the same port and AOF data, when it dies."""
from __future__ import annotations

import redis

from tests.conftest import free_port
from workers.embedded_redis import EmbeddedRedis


def test_ensure_running_restarts_a_dead_server_with_its_data(tmp_path):
    server = EmbeddedRedis(free_port(), tmp_path / "redis")
    server.start()
    try:
        client = redis.Redis(port=server.port)
        client.lpush("sdxl_queue", "job")
        assert server.ensure_running() is False           # alive: nothing to do
        server.proc.kill()
        server.proc.wait(10)
        assert server.ensure_running() is True
        assert client.lrange("sdxl_queue", 0, -1) == [b"job"]   # AOF: written before the kill, there after
    finally:
        server.stop()
    assert server.ensure_running() is False               # stopped on purpose: stays stopped
