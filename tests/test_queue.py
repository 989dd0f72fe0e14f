"""The reliable queue on a real redis-server: FIFO claims, acks, reaping, dead letters, reconnects."""
import json
import threading
import time

import pytest
import redis

from tests.conftest import RedisServer
from workers.queue import JobRecords, ReliableQueue, connect, job_key, processing_key, queue_overview


def push(client, job_id, queue="sdxl_queue"):
    raw = json.dumps({"jobId": job_id, "jobType": "sdxl_image_fast", "userId": "u1"})
    client.lpush(queue, raw)
    return raw.encode()


def make_queue(client, worker="w1", **kw):
    q = ReliableQueue(client, "sdxl_queue", worker, heartbeat_ttl=30, **kw)
    q.register()
    return q


def test_claims_are_fifo_and_live_in_the_processing_list(redis_client):
    q = make_queue(redis_client)
    for i in range(3):
        push(redis_client, f"job-{i}")
    first = q.claim(1)
    assert first.job_id == "job-0" and first.attempts == 1
    assert redis_client.lrange(processing_key("sdxl_queue", "w1"), 0, -1) == [first.raw]
    assert q.claim(1).job_id == "job-1"
    q.ack(first)
    assert redis_client.llen(processing_key("sdxl_queue", "w1")) == 1
    assert redis_client.llen("sdxl_queue") == 1


def test_claim_times_out_when_idle(redis_client):
    q = make_queue(redis_client)
    started = time.monotonic()
    assert q.claim(0.2) is None
    assert 0.15 < time.monotonic() - started < 2


def test_idle_pickup_latency_is_milliseconds(redis_client):
    q = make_queue(redis_client)
    latencies = []
    for i in range(5):
        pusher = threading.Timer(0.05, lambda i=i: (latencies.append(time.perf_counter()), push(redis_client, f"j{i}")))
        pusher.start()
        claim = q.claim(5)
        latencies[-1] = time.perf_counter() - latencies[-1]
        assert claim.job_id == f"j{i}"
        q.ack(claim)
    # Blocking BLMOVE, not polling: a poller would answer in about half its interval. The bounds leave
    # room for a loaded 2-core CI machine; bench/queue_bench.py measures p50/p99.
    assert sorted(latencies)[2] < 0.05 and max(latencies) < 0.5, latencies


def test_reaper_requeues_the_claims_of_a_dead_worker_in_order(redis_client):
    dead = make_queue(redis_client, "dead-worker")
    alive = make_queue(redis_client, "alive-worker")
    for i in range(4):
        push(redis_client, f"job-{i}")
    dead.claim(1), dead.claim(1)
    assert alive.reap() == 0                       # heartbeat still there: not dead
    redis_client.delete("worker:dead-worker")      # what the TTL does when a process dies
    assert alive.reap() == 2
    assert redis_client.llen(processing_key("sdxl_queue", "dead-worker")) == 0
    assert b"dead-worker" not in redis_client.smembers("sdxl_queue:workers")
    order = [alive.claim(1).job_id for _ in range(4)]
    assert order == ["job-0", "job-1", "job-2", "job-3"]
    assert JobRecords(redis_client).get("job-0")["attempts"] == "2"


def test_a_worker_taken_for_dead_rejoins_with_its_next_heartbeat(redis_client):
    slow = make_queue(redis_client, "slow-worker")
    peer = make_queue(redis_client, "peer")
    redis_client.delete("worker:slow-worker")      # an outage longer than the TTL
    peer.reap()
    assert b"slow-worker" not in redis_client.smembers("sdxl_queue:workers")
    slow.heartbeat({"state": "idle"})              # back: listed again, so it can be reaped if it dies later
    assert b"slow-worker" in redis_client.smembers("sdxl_queue:workers")


def test_recover_own_leaves_the_claim_being_finished(redis_client):
    q = make_queue(redis_client)
    for i in range(3):
        push(redis_client, f"job-{i}")
    finishing, lost, also_lost = q.claim(1), q.claim(1), q.claim(1)
    assert q.recover_own(keep=finishing.raw) == 2
    assert redis_client.lrange(q.processing, 0, -1) == [finishing.raw]
    assert [q.claim(1).job_id for _ in range(2)] == [lost.job_id, also_lost.job_id]   # oldest first, as queued


def test_heartbeat_expires_by_ttl(redis_client):
    q = ReliableQueue(redis_client, "sdxl_queue", "short", heartbeat_ttl=0.1)
    q.register()
    assert redis_client.exists("worker:short")
    time.sleep(0.25)
    assert not redis_client.exists("worker:short")


def test_a_restarted_worker_takes_back_its_own_claims(redis_client):
    q = make_queue(redis_client)
    push(redis_client, "job-a")
    q.claim(1)
    again = ReliableQueue(redis_client, "sdxl_queue", "w1")
    assert again.register() == 1
    assert again.claim(1).attempts == 2


def test_requeue_on_shutdown_does_not_count_an_attempt(redis_client):
    q = make_queue(redis_client)
    push(redis_client, "job-s")
    claim = q.claim(1)
    q.requeue(claim, count_attempt=False)
    assert redis_client.hget(job_key("job-s"), "attempts") == b"0"
    assert q.claim(1).attempts == 1


def test_dead_letter_keeps_payload_and_reason(redis_client):
    q = make_queue(redis_client)
    raw = push(redis_client, "job-d")
    claim = q.claim(1)
    q.dead_letter(claim, "poison")
    entry = json.loads(redis_client.lindex("sdxl_queue:dead", 0))
    assert entry["payload"].encode() == raw and entry["reason"] == "poison" and entry["jobId"] == "job-d"
    assert redis_client.llen(processing_key("sdxl_queue", "w1")) == 0


def test_legacy_job_queue_is_drained_oldest_first(redis_client):
    q = ReliableQueue(redis_client, "wan_queue", "v1", legacy_queues=("job_queue",))
    q.register()
    for i in range(3):
        push(redis_client, f"old-{i}", queue="job_queue")
    assert q.drain_legacy() == 3
    assert [q.claim(1).job_id for _ in range(3)] == ["old-0", "old-1", "old-2"]


def test_overview_lists_workers_and_counts(redis_client):
    q = make_queue(redis_client)
    push(redis_client, "a"), push(redis_client, "b")
    q.claim(1)
    view = queue_overview(redis_client, "sdxl_queue")
    assert view["pending"] == 1 and view["processing"] == 1 and view["workers"][0]["alive"]


def test_client_reconnects_after_a_redis_restart(tmp_path):
    server = RedisServer(tmp_path, appendonly=True).start()
    try:
        client = connect(server.url, block_timeout=1)
        push(client, "before")
        server.stop()
        with pytest.raises(redis.ConnectionError):
            client.llen("sdxl_queue")              # retries with backoff, then reports
        server.start()                             # same port, same AOF data
        assert client.llen("sdxl_queue") == 1      # the same client works again
    finally:
        server.stop()
