"""A job ends in one Redis transaction: its record turns terminal, its callback enters the outbox and
its claim is released (acked, or dead-lettered). The callback is delivered after that, so a receiver
that looks at Redis when the terminal callback arrives finds the job ended and no longer claimed;
a worker killed in between leaves the callback in the outbox, not an ended job in processing."""
from __future__ import annotations

import json

import pytest

from storage.local import LocalStorage
from tests.worker_harness import contract_payload
from tools.small_catalog import small_catalog
from workers.callback import CallbackOutbox
from workers.config import Settings
from workers.pipelines.base import LoadOptions
from workers.pipelines.sdxl import SDXLFamily
from workers.queue import JobRecords, ReliableQueue
from workers.runner import Runner


class WitnessSink:
    """A callback receiver that notes, at each terminal callback, what Redis holds for the job."""

    def __init__(self, redis_client, queue: ReliableQueue):
        self.r, self.queue, self.seen = redis_client, queue, {}

    def deliver(self, body: dict) -> None:
        if body["status"] in ("completed", "failed"):
            dead = [json.loads(x)["jobId"] for x in self.r.lrange(self.queue.dead_key, 0, -1)]
            self.seen[body["jobId"]] = {"record": self.r.hget(f"job:{body['jobId']}", "status"),
                                        "claimed": self.r.llen(self.queue.processing), "dead": body["jobId"] in dead,
                                        "pending": self.r.hexists("callbacks:pending", body["jobId"])}


@pytest.fixture
def ending(tmp_path, redis_client, tiny_sdxl):
    catalog = small_catalog(tmp_path / "catalog", limits={"payload_max_bytes": 100_000})
    settings = Settings.from_env({"DATA_DIR": str(tmp_path / "data"), "DEVICE": "cpu", "OVERLAP_FINISH": "0"})
    queue = ReliableQueue(redis_client, "sdxl_queue", "ending-test", 5.0)
    queue.register({"state": "ready"})
    sink = WitnessSink(redis_client, queue)
    family = SDXLFamily.load(LoadOptions(model_path=tiny_sdxl.folder, config_path=None, device="cpu", cache_dir=None))
    runner = Runner(catalog=catalog, settings=settings, queue=queue, records=JobRecords(redis_client),
                    storage=LocalStorage(tmp_path / "storage"), outbox=CallbackOutbox(redis_client, sink),
                    families={"lustify_sdxl": family}, load_errors={}, worker_type="sdxl")

    def run(payload: dict) -> dict:
        redis_client.lpush("sdxl_queue", json.dumps(payload))
        runner.handle(queue.claim(1.0))
        return sink.seen[payload["jobId"]]
    run.runner, run.queue = runner, queue
    return run


def test_a_completed_job_is_unclaimed_when_its_callback_arrives(ending):
    seen = ending(contract_payload(numImages=1, metadata={"num_images": 1}))
    assert seen == {"record": b"completed", "claimed": 0, "dead": False, "pending": True}   # acked; entry until delivered


def test_a_failed_job_is_unclaimed_when_its_callback_arrives(ending):
    seen = ending(contract_payload(prompt="x" * 2001))
    assert seen == {"record": b"failed", "claimed": 0, "dead": False, "pending": True}


def test_a_job_given_up_is_dead_lettered_when_its_callback_arrives(ending, redis_client):
    payload = contract_payload()
    redis_client.hset(f"job:{payload['jobId']}", "attempts", 3)     # three runs died mid-job already
    seen = ending(payload)
    assert seen == {"record": b"failed", "claimed": 0, "dead": True, "pending": True}
    assert redis_client.hexists("callbacks:pending", payload["jobId"]) is False   # delivered: entry gone


def test_a_payload_over_the_size_limit_fails_its_job_with_the_reason(ending, redis_client):
    payload = contract_payload(metadata={"num_images": 2, "padding": "x" * 100_000})
    seen = ending(payload)
    assert seen == {"record": b"failed", "claimed": 0, "dead": False, "pending": True}
    assert "over the 100000-byte limit" in redis_client.hget(f"job:{payload['jobId']}", "error").decode()


def test_a_job_claimed_while_the_worker_stops_goes_back_unstarted(ending, redis_client):
    runner, queue = ending.runner, ending.queue
    payload = contract_payload()
    redis_client.lpush("sdxl_queue", json.dumps(payload))
    claim = queue.claim

    def claim_as_sigterm_arrives(*args, **kwargs):   # SIGTERM lands while BLMOVE waits
        runner.stop.graceful.set()
        return claim(*args, **kwargs)

    queue.claim = claim_as_sigterm_arrives
    runner.serve()
    assert redis_client.lrange("sdxl_queue", 0, -1) == [json.dumps(payload).encode()]   # served next
    assert redis_client.llen(queue.processing) == 0 and redis_client.hget(f"job:{payload['jobId']}", "attempts") == b"0"
    assert redis_client.hget(f"job:{payload['jobId']}", "status") is None              # never started


def test_maintenance_requeues_an_orphaned_claim_but_not_the_one_being_finished(ending, redis_client):
    runner, queue = ending.runner, ending.queue
    finishing, orphan = contract_payload(), contract_payload()
    for payload in (finishing, orphan):
        redis_client.lpush("sdxl_queue", json.dumps(payload))
    runner.finishing = queue.claim(1.0)   # on the finisher's thread, uploading
    queue.claim(1.0)                      # claimed, but its BLMOVE reply was lost: nobody holds it
    runner.maintenance(force=True)
    assert redis_client.lrange(queue.processing, 0, -1) == [runner.finishing.raw]
    assert [json.loads(raw)["jobId"] for raw in redis_client.lrange("sdxl_queue", 0, -1)] == [orphan["jobId"]]


def test_a_finished_claim_is_no_longer_kept_from_recovery(ending, redis_client):
    """With the finisher on: once the job ended, its claim is not `finishing` any more, so a claim left
    behind (a Redis error while finishing) would be the next maintenance's to requeue, not kept forever."""
    from workers.runner import Finisher

    runner, queue = ending.runner, ending.queue
    runner.finisher = Finisher()
    payload = contract_payload(numImages=1, metadata={"num_images": 1})
    redis_client.lpush("sdxl_queue", json.dumps(payload))
    runner.handle(queue.claim(1.0))
    runner.finisher.drain()
    assert runner.finishing is None and redis_client.hget(f"job:{payload['jobId']}", "status") == b"completed"
