"""End to end through real processes: LPUSH a CONTRACT.md payload → the image worker (a subprocess,
tiny SDXL loaded from a single .safetensors file) → PNGs in storage → the callback JSON."""
from __future__ import annotations

import base64
import io
import json
import signal
import threading
import time

import pytest
import redis
from PIL import Image

from tools.small_catalog import write_small_job_types
from tests.supabase_standin import SupabaseStandin
from tests.worker_harness import (USER, WorkerProcess, WorkerStarter, contract_payload, local_callbacks, push, wait_for,
                                  worker_env)


@pytest.fixture
def make_worker(tmp_path, redis_server, redis_client, tiny_sdxl):
    starter = WorkerStarter(tmp_path, redis_server.url, tiny_sdxl)
    yield starter.start
    starter.stop_all()



def png_data_uri(size=(48, 40)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_local_mode_txt2img_and_img2img(tmp_path, make_worker, redis_client):
    worker = make_worker()
    job = contract_payload(seed=1234)
    push(redis_client, job)
    record = wait_for(redis_client, job["jobId"])
    assert record["status"] == "completed", worker.output()
    assert record["steps"] == "2" and record["step"] == "2"
    folder = tmp_path / "data" / "storage" / "sdxl_image_fast" / USER
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"{job['jobId']}_0.png", f"{job['jobId']}_1.png"]
    for name in names:
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and image.size == (64, 64)
    bodies = local_callbacks(tmp_path, job["jobId"])
    assert [b["status"] for b in bodies] == ["processing", "completed"]
    paths = [f"{USER}/{name}" for name in names]
    assert bodies[-1]["imageUrls"] == paths and bodies[-1]["filePath"] == paths[0]
    assert bodies[-1]["seeds"] == [1234, 1235]

    edit = contract_payload("sdxl_img2img", initImage=png_data_uri(), numImages=1, metadata={"num_images": 1})
    push(redis_client, edit)
    record = wait_for(redis_client, edit["jobId"])
    assert record["status"] == "completed", record.get("error")
    assert (tmp_path / "data" / "storage" / "sdxl_img2img" / USER / f"{edit['jobId']}_0.png").exists()


def test_supabase_mode_uploads_and_calls_back_as_the_contract_says(tmp_path, make_worker, redis_client):
    with SupabaseStandin(service_key="service-key-for-tests") as cloud:
        make_worker(SUPABASE_URL=cloud.url, SUPABASE_SERVICE_KEY="service-key-for-tests")
        job = contract_payload(bucket="sdxl_fast", seed=7)
        push(redis_client, job)
        assert wait_for(redis_client, job["jobId"])["status"] == "completed"
        expected = [f"{USER}/{job['jobId']}_{i}.png" for i in range(2)]
        for path in expected:
            data, content_type = cloud.objects[f"sdxl_fast/{path}"]
            assert content_type == "image/png" and Image.open(io.BytesIO(data)).size == (64, 64)
        uploads = cloud.requests_to("/storage/v1/object/")
        assert all(r.headers["x-upsert"] == "true" and r.headers["authorization"] == "Bearer service-key-for-tests" for r in uploads)
        bodies = cloud.callbacks_for(job["jobId"])
        assert bodies[0] == {"jobId": job["jobId"], "status": "processing"}
        assert bodies[-1] == {"jobId": job["jobId"], "status": "completed", "imageUrls": expected,
                              "filePath": expected[0], "seeds": [7, 8], "bucket": "sdxl_fast"}


def test_bad_inputs_fail_with_a_reason_and_the_worker_goes_on(tmp_path, make_worker, redis_client):
    worker = make_worker()
    bad = {
        "unknown type": (contract_payload(jobType="sdxl_image_ultra"), "unknown jobType"),
        "long prompt": (contract_payload(prompt="x" * 2001), "2000-character limit"),
        "traversal": (contract_payload(userId="../../etc"), "userId"),
        "bad image": (contract_payload("sdxl_img2img", initImage="data:image/png;base64,bm90IGFuIGltYWdl"), "image"),
        "too many": (contract_payload(numImages=50, metadata={"num_images": 50}), "between 1 and"),
    }
    for payload, _ in bad.values():
        push(redis_client, payload)
    push(redis_client, b"{this is not json")
    push(redis_client, json.dumps({"jobType": "sdxl_image_fast", "prompt": "no id"}))
    good = contract_payload()
    push(redis_client, good)

    assert wait_for(redis_client, good["jobId"])["status"] == "completed", worker.output()
    for label, (payload, fragment) in bad.items():
        record = wait_for(redis_client, payload["jobId"], timeout=5)
        assert record["status"] == "failed" and fragment in record["error"], (label, record)
        assert local_callbacks(tmp_path, payload["jobId"])[-1]["errorMessage"] == record["error"]
    dead = [json.loads(x) for x in redis_client.lrange("sdxl_queue:dead", 0, -1)]
    assert {d["reason"] for d in dead} >= {"payload has no jobId"} and len(dead) == 2
    assert worker.proc.poll() is None


def test_worker_killed_mid_job_loses_nothing_and_completes_once(tmp_path, make_worker, redis_client):
    job_types = write_small_job_types(tmp_path / "slow", steps=2, job_types={"sdxl_image_high": {"steps": 40}})
    first = make_worker(job_types=job_types)
    job = contract_payload("sdxl_image_high", bucket="sdxl_image_high")
    push(redis_client, job)
    wait_for(redis_client, job["jobId"], statuses=("generating",), field="phase")
    first.kill9()
    assert redis_client.hget(f"job:{job['jobId']}", "status") == b"processing"   # killed mid-job
    second = make_worker(job_types=job_types)       # another id: finds the job through the reaper
    record = wait_for(redis_client, job["jobId"], timeout=240)
    assert record["status"] == "completed", second.output()
    assert record["attempts"] == "2"
    completed = [b for b in local_callbacks(tmp_path, job["jobId"]) if b["status"] == "completed"]
    assert len(completed) == 1
    folder = tmp_path / "data" / "storage" / "sdxl_image_high" / USER
    assert sorted(p.name for p in folder.iterdir()) == [f"{job['jobId']}_{i}.png" for i in range(2)]


def test_a_job_that_keeps_killing_workers_ends_in_the_dead_letter_list(tmp_path, make_worker, redis_client):
    make_worker()
    job = contract_payload()
    redis_client.hset(f"job:{job['jobId']}", "attempts", 3)   # three workers already died on it
    push(redis_client, job)
    record = wait_for(redis_client, job["jobId"])
    assert record["status"] == "failed" and "gave up after 3 attempt(s)" in record["error"]
    assert json.loads(redis_client.lindex("sdxl_queue:dead", 0))["jobId"] == job["jobId"]


@pytest.mark.parametrize("grace, outcome", [("300", "completed"), ("0.2", "queued")])
def test_sigterm_finishes_the_job_or_gives_it_back(tmp_path, make_worker, redis_client, grace, outcome):
    job_types = write_small_job_types(tmp_path / "slow", steps=2, job_types={"sdxl_image_high": {"steps": 30}})
    worker = make_worker(job_types=job_types, STOP_GRACE=grace)
    job = contract_payload("sdxl_image_high", bucket="sdxl_image_high")
    push(redis_client, job)
    wait_for(redis_client, job["jobId"], statuses=("generating",), field="phase")
    assert worker.stop(timeout=300) == 0
    record = wait_for(redis_client, job["jobId"], statuses=(outcome,), timeout=1)
    if outcome == "queued":      # given back at the next step: served next, the attempt not counted
        assert record["attempts"] == "0" and record["phase"] == "requeued"
        assert json.loads(redis_client.lindex("sdxl_queue", -1))["jobId"] == job["jobId"]
    else:
        assert redis_client.llen("sdxl_queue") == 0


def test_a_terminal_ctrl_c_then_the_supervisors_sigterm_still_finishes_the_job(tmp_path, make_worker, redis_client):
    """Ctrl-C reaches the whole process group, and the orchestrator then sends SIGTERM: a supervised
    worker ignores the SIGINT, so the SIGTERM is its first signal and the job finishes."""
    job_types = write_small_job_types(tmp_path / "slow", steps=2, job_types={"sdxl_image_high": {"steps": 30}})
    worker = make_worker(job_types=job_types, STOP_GRACE="300")
    job = contract_payload("sdxl_image_high", bucket="sdxl_image_high")
    push(redis_client, job)
    wait_for(redis_client, job["jobId"], statuses=("generating",), field="phase")
    worker.proc.send_signal(signal.SIGINT)
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(300) == 0
    assert wait_for(redis_client, job["jobId"], timeout=1)["status"] == "completed"


def test_video_worker_serves_the_legacy_queue_and_names_a_missing_checkpoint(tmp_path, make_worker, redis_client,
                                                                            tiny_wan):
    # Only the text-to-video checkpoint is there; image-to-video looks under MODELS_DIR and finds nothing.
    make_worker("video", WAN_MODEL_PATH=str(tiny_wan.t2v))
    legacy = contract_payload("image_fast")
    i2v = contract_payload("video_i2v_fast", format="video", referenceImage=png_data_uri())
    push(redis_client, legacy, queue="job_queue")   # the deprecated list is drained into wan_queue
    push(redis_client, i2v, queue="wan_queue")
    assert wait_for(redis_client, legacy["jobId"])["status"] == "completed"
    folder = tmp_path / "data" / "storage" / "image_fast" / USER
    assert sorted(p.name for p in folder.iterdir()) == [f"{legacy['jobId']}_{i}.png" for i in range(2)]
    record = wait_for(redis_client, i2v["jobId"])
    missing = tmp_path / "data" / "models" / "wan2.1-i2v-14b-480p"
    assert record["status"] == "failed" and record["error"] == (
        f"video_i2v_fast cannot run on this pod: no Wan image-to-video checkpoint at {missing} (a diffusers folder "
        "with model_index.json); set WAN_I2V_MODEL_PATH (absolute, or relative to MODELS_DIR)")
    assert local_callbacks(tmp_path, i2v["jobId"])[-1]["errorMessage"] == record["error"]


def test_a_worker_started_while_redis_is_down_waits_for_it(tmp_path, tiny_sdxl):
    """An outage at start must not crash the worker: five crashes before ready would give it up for good."""
    from tests.conftest import RedisServer

    (tmp_path / "late-redis").mkdir()
    server = RedisServer(tmp_path / "late-redis")
    env = worker_env(server.url, tmp_path / "data", write_small_job_types(tmp_path / "catalog", steps=2),
                     tiny_sdxl.single_file, tiny_sdxl.folder)
    worker = WorkerProcess("image", env, tmp_path / "image.log")
    starting = threading.Thread(target=worker.start, kwargs={"timeout": 120}, daemon=True)
    starting.start()
    deadline = time.monotonic() + 60                # the worker is up, retrying its registration
    while "redis unreachable at start" not in worker.output() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert worker.proc.poll() is None and "redis unreachable at start" in worker.output(), worker.output()
    server.start()
    try:
        starting.join(120)
        assert worker.ready_file.exists(), worker.output()
        client = redis.Redis.from_url(server.url)
        job = contract_payload(numImages=1, metadata={"num_images": 1})
        push(client, job)
        assert wait_for(client, job["jobId"])["status"] == "completed"
    finally:
        worker.stop()
        server.stop()


def test_a_wrong_redis_password_is_a_configuration_error(tmp_path, tiny_sdxl):
    """Not an outage to wait out: the worker exits with 78, which the supervisor does not restart."""
    from tests.conftest import RedisServer

    (tmp_path / "locked-redis").mkdir()
    server = RedisServer(tmp_path / "locked-redis").start()
    redis.Redis(port=server.port).config_set("requirepass", "right")
    try:
        env = worker_env(f"redis://:wrong@127.0.0.1:{server.port}/0", tmp_path / "data",
                         write_small_job_types(tmp_path / "catalog", steps=2), tiny_sdxl.single_file, tiny_sdxl.folder)
        worker = WorkerProcess("image", env, tmp_path / "image.log")
        with pytest.raises(RuntimeError, match="Redis refused the credentials"):
            worker.start(timeout=60)
        assert worker.proc.wait(10) == 78
    finally:
        server.stop()
