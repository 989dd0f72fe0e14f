"""Fallback routing (workers/fallback.py) on a real Redis: the payload rewrite, a worker rerouting the
job it holds, and the orchestrator emptying the queue of a worker given up. The whole path through
real worker processes is the reliability suite's `fallback` scenario (tests/test_reliability.py)."""
from __future__ import annotations

import json
import uuid

import pytest

from tools.small_catalog import small_catalog
from workers.callback import PENDING, CallbackOutbox, LocalStatusSink
from workers.config import Settings
from workers.fallback import StrandedJobRescuer, fallback_note, fallback_payload, reroute_claim, rescue_stranded
from workers.queue import JobRecords, ReliableQueue, default_worker_id

USER = "5f1b9d2c-0000-4000-8000-00000000abcd"
REASON = "the image worker stopped for good (exit code 78)"


@pytest.fixture
def catalog(tmp_path):
    return small_catalog(tmp_path)


def job(job_type: str, **extra) -> dict:
    queue = "sdxl_queue" if job_type.startswith("sdxl") else "wan_queue"
    body = {"jobId": str(uuid.uuid4()), "jobType": job_type, "userId": USER, "prompt": "a lighthouse",
            "modelType": job_type, "isSDXL": True, "numImages": 2, "bucket": f"{job_type}",
            "metadata": {"num_images": 2, "queue": queue, "bucket": job_type, "seed": 5}}
    body.update(extra)
    return body


def test_payload_rewrite_follows_job_types_yaml(catalog):
    for source, target in (("sdxl_image_fast", "image_fast"), ("sdxl_image_high", "image_high"),
                           ("sdxl_image_premium", "image_high")):
        original = job(source)
        rewritten, spec = fallback_payload(original, catalog, REASON)
        assert spec.name == target
        assert rewritten["jobId"] == original["jobId"] and rewritten["userId"] == USER
        assert (rewritten["jobType"], rewritten["modelType"], rewritten["bucket"]) == (target, target, target)
        assert rewritten["metadata"] == {"num_images": 2, "queue": "wan_queue", "seed": 5}  # its bucket dropped
        assert fallback_note(rewritten) == {"from": source, "reason": REASON}
        assert fallback_payload(rewritten, catalog, REASON) is None          # never twice
    assert fallback_payload(job("sdxl_img2img"), catalog, REASON) is None   # no fallback, by design
    assert fallback_payload(job("image_fast"), catalog, REASON) is None
    assert fallback_payload({"jobType": ["junk"]}, catalog, REASON) is None
    assert fallback_note(job("sdxl_image_fast")) is None


def video_worker_alive(redis_client) -> ReliableQueue:
    video = ReliableQueue(redis_client, "wan_queue", "video@test")
    video.register()
    return video


def test_a_worker_reroutes_the_job_it_holds(catalog, redis_client):
    queue = ReliableQueue(redis_client, "sdxl_queue", "image@test")
    records = JobRecords(redis_client)
    body = job("sdxl_image_fast")
    redis_client.lpush("sdxl_queue", json.dumps(body))
    claim = queue.claim(1)
    assert reroute_claim(queue, records, catalog, claim, body, "why") is None   # nobody serves wan_queue
    assert redis_client.llen(queue.processing) == 1
    queue.requeue(claim, count_attempt=False)
    video_worker_alive(redis_client)
    redis_client.rpush("wan_queue", json.dumps(job("image_high")))   # already waiting; the fallback goes first
    claim = queue.claim(1)
    assert reroute_claim(queue, records, catalog, claim, body, "model 'lustify_sdxl' is not loaded") == "image_fast"
    assert redis_client.llen(queue.processing) == 0
    served_next = json.loads(redis_client.rpop("wan_queue"))
    assert (served_next["jobId"], served_next["jobType"]) == (body["jobId"], "image_fast")
    record = records.get(body["jobId"])
    assert (record["status"], record["jobType"], record["fallback_from"], record["attempts"]) == \
        ("queued", "image_fast", "sdxl_image_fast", "0")
    # No fallback: nothing moves, the caller fails the job.
    img2img = job("sdxl_img2img")
    redis_client.lpush("sdxl_queue", json.dumps(img2img))
    claim = queue.claim(1)
    assert reroute_claim(queue, records, catalog, claim, img2img, "why") is None
    assert redis_client.llen(queue.processing) == 1


@pytest.mark.parametrize("enabled", [True, False])
def test_the_queue_of_a_worker_given_up_is_emptied(catalog, redis_client, tmp_path, enabled):
    sink = LocalStatusSink(tmp_path / "jobs")
    outbox = CallbackOutbox(redis_client, sink)
    records = JobRecords(redis_client)
    fast, img2img, high = job("sdxl_image_fast"), job("sdxl_img2img"), job("sdxl_image_high")
    for raw in (json.dumps(fast), json.dumps(img2img), b"\xff not json", json.dumps(high)):
        redis_client.lpush("sdxl_queue", raw)
    video_worker_alive(redis_client)

    counts = rescue_stranded(redis_client, catalog, "sdxl_queue", REASON, outbox, records, enabled, clock=lambda: 1.0)

    assert redis_client.llen("sdxl_queue") == 0
    assert redis_client.llen("sdxl_queue:dead") == 1                    # no jobId: kept for a person
    routed = [json.loads(raw) for raw in reversed(redis_client.lrange("wan_queue", 0, -1))]   # oldest first
    failed = [img2img] + ([] if enabled else [fast, high])
    assert counts == {"rerouted": 2 if enabled else 0, "failed": len(failed) + 1}
    assert [(b["jobId"], b["jobType"]) for b in routed] == \
        ([(fast["jobId"], "image_fast"), (high["jobId"], "image_high")] if enabled else [])
    for body in failed:
        message = sink.read(body["jobId"])["errorMessage"]
        assert REASON in message and ("no fallback" in message or "fallback routing is off" in message)
        assert records.get(body["jobId"])["status"] == "failed"
    assert redis_client.hlen(PENDING) == 0                                # every failed callback delivered


def test_without_a_live_video_worker_the_rescue_fails_jobs_with_the_reason(catalog, redis_client, tmp_path):
    sink = LocalStatusSink(tmp_path / "jobs")
    fast = job("sdxl_image_fast")
    redis_client.lpush("sdxl_queue", json.dumps(fast))
    counts = rescue_stranded(redis_client, catalog, "sdxl_queue", REASON, CallbackOutbox(redis_client, sink),
                             JobRecords(redis_client), True, clock=lambda: 1.0)
    assert counts == {"rerouted": 0, "failed": 1} and redis_client.llen("wan_queue") == 0
    assert "no live worker serves its fallback's queue wan_queue" in sink.read(fast["jobId"])["errorMessage"]


def test_the_orchestrator_leaves_a_queue_that_another_pod_serves(catalog, redis_client, tmp_path):
    settings = Settings.from_env({"DATA_DIR": str(tmp_path), "REDIS_URL": "redis://unused"})
    rescuer = StrandedJobRescuer(redis_client, catalog, settings)
    body = job("sdxl_image_fast")
    redis_client.lpush("sdxl_queue", json.dumps(body))
    other_pod = ReliableQueue(redis_client, "sdxl_queue", "image@another-pod")
    other_pod.register()
    ours = ReliableQueue(redis_client, "sdxl_queue", default_worker_id("image"))
    ours.register()                               # our own dead worker's heartbeat has not expired yet
    fatal = {"image": {"state": "fatal", "last_exit": 78}, "video": {"state": "running"}}
    video_worker_alive(redis_client)

    assert rescuer.check(fatal) == {}             # another pod's image worker is alive: leave its queue
    assert rescuer.check({"image": {"state": "running"}}) == {}
    other_pod.deregister()
    assert rescuer.check(fatal) == {"sdxl_queue": {"rerouted": 1, "failed": 0}}
    assert json.loads(redis_client.rpop("wan_queue"))["jobType"] == "image_fast"


def test_the_job_a_given_up_worker_held_is_rescued_once_its_heartbeat_expired(catalog, redis_client, tmp_path):
    settings = Settings.from_env({"DATA_DIR": str(tmp_path), "REDIS_URL": "redis://unused"})
    rescuer = StrandedJobRescuer(redis_client, catalog, settings)
    dead = ReliableQueue(redis_client, "sdxl_queue", default_worker_id("image"))
    dead.register()
    held = job("sdxl_image_high")
    redis_client.lpush("sdxl_queue", json.dumps(held))
    dead.claim(1)                                  # it died holding this one
    video_worker_alive(redis_client)
    fatal = {"image": {"state": "fatal", "last_exit": -9}, "video": {"state": "running"}}
    assert rescuer.check(fatal) == {"sdxl_queue": {"rerouted": 0, "failed": 0}}   # its heartbeat is still fresh
    redis_client.delete(dead.heartbeat_key)        # the TTL runs out
    assert rescuer.check(fatal) == {"sdxl_queue": {"rerouted": 1, "failed": 0}}
    assert redis_client.llen(dead.processing) == 0
    assert json.loads(redis_client.rpop("wan_queue"))["jobId"] == held["jobId"]
