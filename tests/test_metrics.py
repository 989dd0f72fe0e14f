"""workers/metrics.py: /health and /metrics from the supervisor's view and Redis, over real HTTP."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tools.small_catalog import small_catalog

from workers.metrics import count_job, health, job_type_label, observe_duration, render_metrics, serve
from workers.queue import ReliableQueue

RUNNING = {"image": {"state": "running", "pid": 11, "restarts": 2, "last_exit": -9},
           "video": {"state": "running", "pid": 12, "restarts": 0, "last_exit": None}}


@pytest.fixture
def catalog(tmp_path):
    return small_catalog(tmp_path)


def beat(redis_client, queue, worker, **info):
    ReliableQueue(redis_client, queue, worker, heartbeat_ttl=30).register({"state": "idle", "job": None, **info})


def test_health_is_200_only_when_every_process_runs_and_beats(redis_client, catalog):
    beat(redis_client, "sdxl_queue", "image@test")
    assert health(RUNNING, redis_client, catalog)[0] == 503          # no video worker heartbeat yet
    beat(redis_client, "wan_queue", "video@test")
    code, report = health(RUNNING, redis_client, catalog)
    assert code == 200 and report["ok"] and report["workers"]["image"][0]["alive"]
    assert report["queues"]["job_queue"] == {"pending": 0}
    backoff = {**RUNNING, "image": {**RUNNING["image"], "state": "backoff", "pid": None}}
    assert health(backoff, redis_client, catalog)[0] == 503


def test_metrics_text(redis_client, catalog):
    count_job(redis_client, "sdxl_image_fast", "completed")
    count_job(redis_client, "sdxl_image_fast", "completed")
    count_job(redis_client, job_type_label(b'{"jobType": "x\\"y"}', catalog), "failed")
    observe_duration(redis_client, "sdxl_image_fast", 0.8)
    observe_duration(redis_client, "sdxl_image_fast", 3.0)
    redis_client.lpush("sdxl_queue", "{}")
    beat(redis_client, "sdxl_queue", 'odd"id', vram_bytes=5 * 2**30)
    text = render_metrics(RUNNING, redis_client, catalog)
    samples = {family.name: family for family in text_string_to_metric_families(text)}   # the reference parser
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in samples.values() for s in f.samples}
    assert value[("ourvidz_jobs_total", (("job_type", "sdxl_image_fast"), ("status", "completed")))] == 2
    assert value[("ourvidz_jobs_total", (("job_type", "unknown"), ("status", "failed")))] == 1
    assert samples["ourvidz_jobs"].type == "counter" and samples["ourvidz_job_seconds"].type == "histogram"
    fast = (("job_type", "sdxl_image_fast"),)
    assert value[("ourvidz_job_seconds_bucket", fast + (("le", "1"),))] == 1
    assert value[("ourvidz_job_seconds_bucket", fast + (("le", "5"),))] == 2
    assert value[("ourvidz_job_seconds_count", fast)] == 2 and value[("ourvidz_job_seconds_sum", fast)] == 3.8
    assert value[("ourvidz_queue_pending", (("queue", "sdxl_queue"),))] == 1
    assert value[("ourvidz_process_restarts_total", (("process", "image"),))] == 2
    assert value[("ourvidz_worker_alive", (("queue", "sdxl_queue"), ("worker", 'odd"id')))] == 1
    assert value[("ourvidz_worker_vram_bytes", (("queue", "sdxl_queue"), ("worker", 'odd"id')))] == 5 * 2**30
    assert value[("ourvidz_redis_up", ())] == 1


def test_job_type_labels_are_bounded(catalog):
    assert job_type_label(b"[" * 5000, catalog) == "unknown"
    assert job_type_label(b'{"jobType": "sdxl_img2img"}', catalog) == "sdxl_img2img"


def test_served_over_http_and_redis_down_is_503(redis_server, redis_client, catalog):
    port = free_port()
    server = serve("127.0.0.1", port, lambda: RUNNING, redis_server.url, catalog)
    try:
        beat(redis_client, "sdxl_queue", "image@test")
        beat(redis_client, "wan_queue", "video@test")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            assert response.status == 200 and json.load(response)["ok"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.headers["Content-Type"].startswith("text/plain") and b"ourvidz_process_up" in response.read()
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=5)
        assert err.value.code == 404
    finally:
        server.shutdown()
    down = serve("127.0.0.1", free_port(), lambda: RUNNING, f"redis://127.0.0.1:{free_port()}/0", catalog)
    try:
        code, report = health(RUNNING, down.RequestHandlerClass.client, catalog)
        assert code == 503 and report["redis"].startswith("unreachable")
        assert "ourvidz_redis_up 0.0" in render_metrics(RUNNING, down.RequestHandlerClass.client, catalog)
    finally:
        down.shutdown()


def test_port_zero_turns_it_off(redis_server, catalog):
    assert serve("127.0.0.1", 0, lambda: RUNNING, redis_server.url, catalog) is None
