"""Callback bodies, sinks and the Redis outbox, against real Redis and the loopback Supabase stand-in."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time

import pytest
import redis
import requests

from tests.conftest import free_port
from tests.supabase_standin import CALLBACK_PATH, SupabaseStandin
from workers.callback import (ATTEMPTS, DEAD, DUE, PENDING, CallbackError, CallbackOutbox, HttpCallback,
                              LocalStatusSink, completed_body, failed_body, make_callback_sink, processing_body)
from workers.config import Settings

KEY = "service-key-for-tests"
SECRET = "callback-secret-for-tests"


class Clock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def cloud():
    with SupabaseStandin(service_key=KEY) as standin:
        yield standin


def outbox_for(r, sink, clock=None, **kwargs) -> CallbackOutbox:
    return CallbackOutbox(r, sink, clock=clock or Clock(), sleep=lambda s: None, **kwargs)


def down_sink() -> HttpCallback:
    """A receiver that refuses connections at once (nothing listens on the port)."""
    return HttpCallback(f"http://127.0.0.1:{free_port()}", KEY, timeout=2)


# --- bodies -----------------------------------------------------------------------------------------
def test_completed_body_several_images():
    paths = ["u/j_0.png", "u/j_1.png", "u/j_2.png"]
    assert completed_body("j", paths, "image") == {
        "jobId": "j", "status": "completed", "filePath": "u/j_0.png", "imageUrls": paths}


def test_completed_body_one_image_has_both_names():
    assert completed_body("j", ["u/j_0.png"], "image") == {
        "jobId": "j", "status": "completed", "filePath": "u/j_0.png", "imageUrls": ["u/j_0.png"]}


def test_completed_body_video_is_file_path_only():
    assert completed_body("j", ["u/j_0.mp4"], "video") == {"jobId": "j", "status": "completed", "filePath": "u/j_0.mp4"}


def test_failed_and_processing_bodies():
    assert failed_body("j", "out of memory") == {"jobId": "j", "status": "failed", "errorMessage": "out of memory"}
    assert processing_body("j") == {"jobId": "j", "status": "processing"}
    assert len(failed_body("j", "x" * 10_000)["errorMessage"]) == 2000
    with pytest.raises(ValueError):
        completed_body("j", [], "image")
    with pytest.raises(ValueError):
        completed_body("j", ["u/a"], "audio")


# --- HttpCallback -----------------------------------------------------------------------------------
def test_http_callback_signs_with_hmac():
    body = completed_body("job-1", ["u/job-1_0.png", "u/job-1_1.png"], "image")
    with SupabaseStandin(service_key=KEY, callback_secret=SECRET) as cloud:
        HttpCallback(cloud.url, KEY, secret=SECRET, timeout=5).deliver(body)
        (request,) = cloud.requests
    assert request.method == "POST" and request.path == "/functions/v1/job-callback"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"
    timestamp = request.headers["x-callback-timestamp"]
    assert timestamp.isdigit() and abs(int(timestamp) - time.time()) < 60
    expected = hmac.new(SECRET.encode(), f"{timestamp}.{request.body.decode()}".encode(), hashlib.sha256).hexdigest()
    assert request.headers["x-callback-signature"] == f"v1={expected}"
    assert json.loads(request.body) == body
    assert cloud.callbacks == [body]


def test_http_callback_without_secret_sends_no_signature(cloud):
    HttpCallback(cloud.url, KEY, timeout=5).deliver(processing_body("job-1"))
    (request,) = cloud.requests
    assert "x-callback-signature" not in request.headers and "x-callback-timestamp" not in request.headers
    assert cloud.callbacks == [{"jobId": "job-1", "status": "processing"}]


def test_standin_rejects_bad_signature_and_key():
    with SupabaseStandin(service_key=KEY, callback_secret=SECRET) as cloud:
        url = cloud.url + CALLBACK_PATH
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
                   "X-Callback-Timestamp": str(int(time.time())), "X-Callback-Signature": "v1=" + "0" * 64}
        assert requests.post(url, data=b'{"jobId":"j","status":"failed"}', headers=headers, timeout=5).status_code == 401
        with pytest.raises(CallbackError) as err:
            HttpCallback(cloud.url, KEY, secret="another-secret", timeout=5).deliver(processing_body("j"))
        assert err.value.retryable is False
        with pytest.raises(CallbackError) as err:
            HttpCallback(cloud.url, "wrong-key", secret=SECRET, timeout=5).deliver(processing_body("j"))
        assert err.value.retryable is False and "401" in str(err.value)
        assert cloud.callbacks == []


@pytest.mark.parametrize("status,retryable", [(500, True), (502, True), (503, True), (408, True), (429, True),
                                              (400, False), (404, False), (422, False)])
def test_http_callback_error_classes(cloud, status, retryable):
    cloud.fail_next(CALLBACK_PATH, 1, status=status)
    with pytest.raises(CallbackError) as err:
        HttpCallback(cloud.url, KEY, timeout=5).deliver(processing_body("j"))
    assert err.value.retryable is retryable and f"HTTP {status}" in str(err.value)


def test_http_callback_timeout_and_refused_are_retryable(cloud):
    cloud.hang_next(CALLBACK_PATH, 1, seconds=0.5)
    with pytest.raises(CallbackError) as err:
        HttpCallback(cloud.url, KEY, timeout=0.1).deliver(processing_body("j"))
    assert err.value.retryable is True
    with pytest.raises(CallbackError) as err:
        down_sink().deliver(processing_body("j"))
    assert err.value.retryable is True


# --- LocalStatusSink --------------------------------------------------------------------------------
def test_local_status_sink_keeps_latest_and_history(tmp_path):
    clock = Clock(100.0)
    sink = LocalStatusSink(tmp_path / "jobs", clock=clock)
    sink.deliver(processing_body("job-1"))
    clock.advance(5)
    sink.deliver(failed_body("job-1", "boom"))
    clock.advance(5)
    sink.deliver(completed_body("job-1", ["u/job-1_0.mp4"], "video"))
    record = json.loads((tmp_path / "jobs" / "job-1.json").read_text())
    assert record["status"] == "completed" and record["filePath"] == "u/job-1_0.mp4"
    assert "errorMessage" not in record and record["updatedAt"] == 110.0
    assert record["history"] == [{"status": "processing", "at": 100.0}, {"status": "failed", "at": 105.0},
                                 {"status": "completed", "at": 110.0}]
    assert sink.read("job-1") == record
    lines = (tmp_path / "jobs" / "callbacks.jsonl").read_text().splitlines()
    assert [json.loads(line)["status"] for line in lines] == ["processing", "failed", "completed"]
    assert sorted(os.listdir(tmp_path / "jobs")) == [".lock", "callbacks.jsonl", "job-1.json"]


def test_local_status_sink_ignores_repeats_and_late_progress(tmp_path):
    # The outbox resends a body when its sender died after delivering it; a progress report can
    # arrive late. Like the live job-callback, a finished record then stays as it is.
    sink = LocalStatusSink(tmp_path / "jobs")
    done = completed_body("job-2", ["u/job-2_0.png"], "image")
    for body in (processing_body("job-2"), done, done, processing_body("job-2")):
        sink.deliver(body)
    record = sink.read("job-2")
    assert record["status"] == "completed" and [h["status"] for h in record["history"]] == ["processing", "completed"]
    assert len((tmp_path / "jobs" / "callbacks.jsonl").read_text().splitlines()) == 4   # every receipt is logged


def test_local_status_sink_rejects_unsafe_job_id(tmp_path):
    with pytest.raises(CallbackError) as err:
        LocalStatusSink(tmp_path).deliver({"jobId": "../x", "status": "failed"})
    assert err.value.retryable is False
    assert list(tmp_path.iterdir()) == []


def test_make_callback_sink_picks(tmp_path):
    local = make_callback_sink(Settings.from_env({"DATA_DIR": str(tmp_path)}))
    assert isinstance(local, LocalStatusSink) and local.jobs_dir == tmp_path.resolve() / "jobs"
    remote = make_callback_sink(Settings.from_env({"DATA_DIR": str(tmp_path), "SUPABASE_URL": "https://x.supabase.co",
                                                   "SUPABASE_SERVICE_KEY": KEY, "CALLBACK_SECRET": SECRET}))
    assert isinstance(remote, HttpCallback)
    assert remote.endpoint == "https://x.supabase.co/functions/v1/job-callback" and remote.secret == SECRET


# --- CallbackOutbox ---------------------------------------------------------------------------------
def test_terminal_delivered_at_once(redis_client, cloud):
    body = completed_body("job-1", ["u/job-1_0.png"], "image")
    outbox = outbox_for(redis_client, HttpCallback(cloud.url, KEY, timeout=5))
    assert outbox.send_terminal("job-1", body) is True
    assert cloud.callbacks == [body]
    assert outbox.pending_count() == 0
    assert not any(redis_client.exists(k) for k in (PENDING, DUE, ATTEMPTS, DEAD))


def test_a_redis_error_after_the_commit_defers_delivery_and_never_raises(redis_client, cloud):
    """Redis refuses writes (NOREPLICAS) right after the transaction committed, while the callback
    is delivered: send_terminal must not raise (the caller would treat the job as not ended)."""
    clock = Clock()

    class RefusingWritesAfterFirstDelivery(HttpCallback):
        refused = False

        def deliver(self, body):
            super().deliver(body)
            if not self.refused:
                self.refused = True
                redis_client.config_set("min-replicas-to-write", 1)   # the outbox's bookkeeping now fails

    outbox = outbox_for(redis_client, RefusingWritesAfterFirstDelivery(cloud.url, KEY, timeout=5), clock=clock)
    body = completed_body("job-9", ["u/job-9_0.png"], "image")
    try:
        assert outbox.send_terminal("job-9", body, same_transaction=lambda pipe: pipe.hset("job:job-9", "status", "completed")) is False
    finally:
        redis_client.config_set("min-replicas-to-write", 0)
    assert redis_client.hget("job:job-9", "status") == b"completed" and outbox.pending_count() == 1
    clock.advance(3600)
    assert outbox.deliver_due() == 1 and outbox.pending_count() == 0   # sent again later: receivers dedupe
    assert cloud.callbacks == [body, body]


def test_undeliverable_stays_pending_until_receiver_recovers(redis_client, cloud):
    clock, sleeps = Clock(), []
    body = failed_body("job-2", "no GPU")
    cloud.fail_next(CALLBACK_PATH, 1000, status=503)
    outbox = CallbackOutbox(redis_client, HttpCallback(cloud.url, KEY, timeout=5), clock=clock, sleep=sleeps.append)
    assert outbox.send_terminal("job-2", body) is False
    assert len(cloud.requests) == 3 and len(sleeps) == 2 and sum(sleeps) <= 3  # quick tries only
    assert outbox.pending_count() == 1 and int(redis_client.hget(ATTEMPTS, "job-2")) == 1
    assert json.loads(redis_client.hget(PENDING, "job-2")) == body

    assert outbox.deliver_due() == 0 and len(cloud.requests) == 3  # not due yet
    clock.advance(10)
    assert outbox.deliver_due() == 0 and len(cloud.requests) == 4  # due, still failing
    assert int(redis_client.hget(ATTEMPTS, "job-2")) == 2

    cloud.clear_faults()
    clock.advance(400)
    assert outbox.deliver_due() == 1
    assert cloud.callbacks == [body] and outbox.pending_count() == 0
    assert not any(redis_client.exists(k) for k in (PENDING, DUE, ATTEMPTS))


def test_backoff_grows_and_is_capped(redis_client, cloud):
    clock = Clock()
    cloud.fail_next(CALLBACK_PATH, 1000, status=503)
    outbox = outbox_for(redis_client, HttpCallback(cloud.url, KEY, timeout=5), clock, backoff_base=2, backoff_cap=300)
    outbox.send_terminal("job-3", processing_body("job-3") | {"status": "completed", "filePath": "u/f.mp4"})
    delays = []
    for _ in range(12):
        delays.append(redis_client.zscore(DUE, "job-3") - clock.now)
        clock.advance(1000)
        assert outbox.deliver_due() == 0
    assert delays[0] < delays[3] < delays[6] and max(delays) <= 300 and delays[-1] == 300


def test_same_transaction_is_one_multi_exec(redis_client, cloud):
    outbox = outbox_for(redis_client, HttpCallback(cloud.url, KEY, timeout=5))
    body = completed_body("job-4", ["u/job-4_0.mp4"], "video")
    mark = lambda pipe: pipe.hset("job:job-4", mapping={"status": "completed"})  # noqa: E731
    with redis_client.monitor() as monitor:
        sender = threading.Thread(target=outbox.send_terminal, args=("job-4", body), kwargs={"same_transaction": mark})
        sender.start()
        commands = []
        while not commands or commands[-1] != "EXEC":
            commands.append(monitor.next_command()["command"].split()[0].upper())
        sender.join(10)
    # A fresh pool connection may say HELLO / CLIENT first; the transaction is what follows.
    assert commands[commands.index("MULTI"):] == ["MULTI", "HSET", "ZADD", "HDEL", "HSET", "EXEC"]
    assert redis_client.hget("job:job-4", "status") == b"completed"
    assert cloud.callbacks == [body]


def test_same_transaction_failure_persists_nothing(redis_client, cloud):
    outbox = outbox_for(redis_client, HttpCallback(cloud.url, KEY, timeout=5))

    def broken(pipe):
        pipe.hset("job:job-5", "status", "completed")
        raise RuntimeError("record update failed")

    with pytest.raises(RuntimeError):
        outbox.send_terminal("job-5", failed_body("job-5", "x"), same_transaction=broken)
    assert redis_client.keys("*") == [] and cloud.requests == []


def test_two_outboxes_deliver_each_entry_exactly_once(redis_server, redis_client, cloud):
    clock = Clock()
    seeding = outbox_for(redis_client, down_sink(), clock)
    bodies = {f"job-{i}": failed_body(f"job-{i}", f"reason {i}") for i in range(20)}
    for job_id, body in bodies.items():
        assert seeding.send_terminal(job_id, body) is False
    assert seeding.pending_count() == 20
    clock.advance(1000)
    cloud.hang_next(CALLBACK_PATH, 1000, seconds=0.01)  # make deliveries overlap

    clients = [redis.Redis.from_url(redis_server.url) for _ in range(2)]
    outboxes = [outbox_for(c, HttpCallback(cloud.url, KEY, timeout=5), clock) for c in clients]
    start, results = threading.Barrier(2), []

    def run(outbox):
        start.wait()
        results.append(outbox.deliver_due())

    threads = [threading.Thread(target=run, args=(o,)) for o in outboxes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for client in clients:
        client.close()
    assert sum(results) == 20
    assert sorted(b["jobId"] for b in cloud.callbacks) == sorted(bodies)
    assert len(cloud.requests_to(CALLBACK_PATH)) == 20
    assert seeding.pending_count() == 0


def test_refused_callback_goes_to_dead_and_can_be_replayed(redis_client, cloud):
    clock = Clock()
    body = completed_body("job-6", ["u/job-6_0.png", "u/job-6_1.png"], "image")
    cloud.fail_next(CALLBACK_PATH, 1, status=400)
    outbox = outbox_for(redis_client, HttpCallback(cloud.url, KEY, timeout=5), clock)
    assert outbox.send_terminal("job-6", body) is False
    assert len(cloud.requests) == 1  # never retried
    assert outbox.pending_count() == 0 and not redis_client.exists(DUE)
    (record,) = outbox.dead()
    assert record["jobId"] == "job-6" and "HTTP 400" in record["reason"] and record["body"] == body

    assert outbox.replay_dead() == 1 and outbox.dead() == [] and outbox.pending_count() == 1
    assert outbox.deliver_due() == 1 and cloud.callbacks == [body]


def test_deliver_due_stops_early_when_receiver_is_down(redis_client, cloud):
    clock = Clock()
    seeding = outbox_for(redis_client, down_sink(), clock)
    for i in range(5):
        seeding.send_terminal(f"job-{i}", failed_body(f"job-{i}", "x"))
    clock.advance(1000)
    cloud.fail_next(CALLBACK_PATH, 1000, status=503)
    assert outbox_for(redis_client, HttpCallback(cloud.url, KEY, timeout=5), clock).deliver_due() == 0
    assert len(cloud.requests) == 3  # the other two stay due for the next pass
    assert len(redis_client.zrangebyscore(DUE, "-inf", clock.now)) == 2


def test_stale_delivery_keeps_a_newer_body(redis_client, cloud):
    clock = Clock()
    older, newer = failed_body("job-7", "first run failed"), completed_body("job-7", ["u/job-7_0.mp4"], "video")
    real = HttpCallback(cloud.url, KEY, timeout=5)
    rerun = outbox_for(redis_client, down_sink(), clock)

    class RerunDuringDelivery:
        """The job's re-run finishes while the old body is on the wire."""
        fired = False

        def deliver(self, body):
            real.deliver(body)
            if not self.fired:
                self.fired = True
                rerun.send_terminal("job-7", newer)

    outbox = outbox_for(redis_client, RerunDuringDelivery(), clock)
    assert outbox.send_terminal("job-7", older) is True
    assert json.loads(redis_client.hget(PENDING, "job-7")) == newer
    clock.advance(1000)
    assert outbox.deliver_due() == 1
    assert cloud.callbacks == [older, newer] and outbox.pending_count() == 0


def test_claim_of_a_dead_worker_expires(redis_client, cloud):
    clock = Clock()
    outbox_for(redis_client, down_sink(), clock).send_terminal("job-8", failed_body("job-8", "x"))
    clock.advance(1000)

    class DiesMidDelivery:
        def deliver(self, body):
            raise SystemExit("worker killed")

    with pytest.raises(SystemExit):
        outbox_for(redis_client, DiesMidDelivery(), clock, claim_lease=120).deliver_due()
    survivor = outbox_for(redis_client, HttpCallback(cloud.url, KEY, timeout=5), clock)
    assert survivor.deliver_due() == 0  # still leased to the dead worker
    clock.advance(121)
    assert survivor.deliver_due() == 1 and cloud.callbacks == [failed_body("job-8", "x")]


def test_progress_is_best_effort(redis_client, cloud):
    outbox = outbox_for(redis_client, HttpCallback(cloud.url, KEY, timeout=5))
    cloud.fail_next(CALLBACK_PATH, 1, status=503)
    assert outbox.send_progress(processing_body("job-9")) is False
    assert len(cloud.requests) == 1 and redis_client.keys("*") == []
    assert outbox.send_progress(processing_body("job-9")) is True
    assert cloud.callbacks == [processing_body("job-9")]


def test_outbox_with_local_sink(redis_client, tmp_path):
    sink = LocalStatusSink(tmp_path / "jobs")
    outbox = outbox_for(redis_client, sink)
    outbox.send_progress(processing_body("job-10"))
    assert outbox.send_terminal("job-10", completed_body("job-10", ["u/a.png", "u/b.png"], "image")) is True
    record = sink.read("job-10")
    assert record["status"] == "completed" and record["imageUrls"] == ["u/a.png", "u/b.png"]
    assert [h["status"] for h in record["history"]] == ["processing", "completed"]
