"""ReliableQueue.claim(prefer=...) on a real redis-server: jobs for models already on the GPU go first
within a window of the oldest jobs, and the oldest job is passed over at most `max_skips` times."""
from __future__ import annotations

import json

import redis

from tests.conftest import RedisServer
from workers.queue import ReliableQueue


def push(client, job_id: str, job_type: str) -> None:
    client.lpush("sdxl_queue", json.dumps({"jobId": job_id, "jobType": job_type, "userId": "u"}))


def claimed_ids(queue: ReliableQueue, count: int, **prefer) -> list[str]:
    out = []
    for _ in range(count):
        claim = queue.claim(0.1, **prefer)
        out.append(claim.job_id)
        queue.ack(claim)
    return out


def test_without_preference_the_oldest_goes_first(redis_client):
    queue = ReliableQueue(redis_client, "sdxl_queue", "w1")
    for i, job_type in enumerate(["sdxl_image_fast", "z_image_turbo", "qwen_image_2512"]):
        push(redis_client, f"j{i}", job_type)
    assert claimed_ids(queue, 3) == ["j0", "j1", "j2"]


def test_resident_jobs_first_without_starving_the_oldest(redis_client):
    queue = ReliableQueue(redis_client, "sdxl_queue", "w1")
    push(redis_client, "old-qwen", "qwen_image_2512")
    for i in range(4):
        push(redis_client, f"z{i}", "z_image_turbo")
    prefer = {"prefer": ["z_image_turbo"], "window": 8, "max_skips": 2}
    # Two Z-Image jobs jump the queue, then the Qwen job has waited long enough.
    assert claimed_ids(queue, 3, **prefer) == ["z0", "z1", "old-qwen"]
    assert redis_client.hget("job:old-qwen", "skipped") == b"3"
    assert claimed_ids(queue, 2, **prefer) == ["z2", "z3"]
    assert queue.claim(0.1, **prefer) is None and redis_client.llen(queue.processing) == 0


def test_only_the_window_is_searched_and_a_claim_counts_its_attempt(redis_client):
    queue = ReliableQueue(redis_client, "sdxl_queue", "w1")
    for i in range(3):
        push(redis_client, f"q{i}", "qwen_image_2512")
    push(redis_client, "z-late", "z_image_turbo")          # fourth oldest: outside a window of 3
    assert claimed_ids(queue, 1, prefer=["z_image_turbo"], window=3) == ["q0"]
    claim = queue.claim(0.1, prefer=["z_image_turbo"], window=4)
    assert claim.job_id == "z-late" and claim.attempts == 1
    assert redis_client.lrange(queue.processing, 0, -1) == [claim.raw]   # claimed like any other: recoverable
    assert [json.loads(x)["jobId"] for x in redis_client.lrange("sdxl_queue", 0, -1)] == ["q2", "q1"]


def test_a_redis_without_scripting_falls_back_to_fifo(tmp_path):
    server = RedisServer(tmp_path, extra_args=("--rename-command", "EVAL", "")).start()   # EVAL refused
    try:
        client = redis.Redis.from_url(server.url)
        queue = ReliableQueue(client, "sdxl_queue", "w1")
        push(client, "old-qwen", "qwen_image_2512")
        push(client, "z0", "z_image_turbo")
        assert claimed_ids(queue, 2, prefer=["z_image_turbo"]) == ["old-qwen", "z0"]
        assert queue.scripting is False
    finally:
        server.stop()
