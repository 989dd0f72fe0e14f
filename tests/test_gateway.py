"""The RYLA gateway end to end: an HTTP client → the gateway process (python -m gateway) → the same
queues and real worker processes (tiny random-weight SDXL and Wan) → storage → bytes back."""
from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import uuid

import httpx
import pytest
import redis

from gateway.app import IDEMPOTENCY_NAMESPACE
from tests.conftest import RedisServer
from tests.gateway_harness import SERVED_FAMILIES, GatewayProcess, decoded, image_uri, sdxl_and_wan_catalog
from tests.worker_harness import WorkerProcess, wait_for, worker_env

PRICE = "3.6"   # USD per GPU-hour: X-Cost-USD is then the job's seconds / 1000


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_sdxl, tiny_wan, tiny_image_models):
    """Own redis-server, an image worker (SDXL, Qwen-Image-Edit) and a video worker (Wan), and a
    gateway that waits up to 120 s."""
    root = tmp_path_factory.mktemp("gateway")
    server = RedisServer(root).start()
    job_types = sdxl_and_wan_catalog(root / "catalog", served=SERVED_FAMILIES + ("qwen_image_edit",),
                                     width=96, height=96, steps=2, frames=9)
    models = {"WAN_MODEL_PATH": str(tiny_wan.t2v), "WAN_I2V_MODEL_PATH": str(tiny_wan.i2v),
              "WAN_VACE_MODEL_PATH": str(tiny_wan.vace), "QWEN_IMAGE_EDIT_MODEL_PATH": str(tiny_image_models.qwen_edit)}
    env = worker_env(server.url, root / "data", job_types, tiny_sdxl.single_file, tiny_sdxl.folder, **models)
    workers = [WorkerProcess(name, {**env, "WORKER_ID": f"{name}-gw"}, root / f"{name}.log") for name in ("image", "video")]
    (root / "loras").mkdir()
    (root / "loras" / "character-known.safetensors").write_bytes(b"not needed: the gateway stops at 501")
    gateway_env = {**env, "GPU_PRICE_PER_HOUR": PRICE, "GPU_TYPE": "test-gpu", "GATEWAY_WAIT_SECONDS": "120",
                   "GATEWAY_MAX_BODY_BYTES": "2000000", "LORAS_DIR": str(root / "loras")}
    started: list = []
    try:
        for worker in workers:
            started.append(worker.start())
        gateway = GatewayProcess(gateway_env, root / "gateway.log").start()
        started.append(gateway)
        yield type("Stack", (), {"root": root, "env": gateway_env, "gateway": gateway, "workers": workers,
                                 "redis": redis.Redis.from_url(server.url), "url": server.url})
    finally:
        for process in reversed(started):
            process.stop()
        server.stop()


def test_image_endpoint_returns_a_jpeg_of_the_requested_size_through_the_normal_job_path(stack):
    with stack.gateway.client() as http:
        response = http.post("/sdxl-lightning", json={"prompt": "a lighthouse", "width": 96, "height": 64,
                                                       "steps": 2, "cfg": 5.0, "seed": 42})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    image = decoded(response)
    assert image.format == "JPEG" and image.size == (96, 64)
    seconds = float(response.headers["X-Execution-Time-Sec"])
    assert seconds > 0 and response.headers["X-GPU-Type"] == "test-gpu" and response.headers["X-Seed"] == "42"
    assert float(response.headers["X-Cost-USD"]) == pytest.approx(seconds * float(PRICE) / 3600, abs=2e-6)
    # The same record, storage and worker as any queued job.
    job_id = response.headers["X-Job-Id"]
    record = {k.decode(): v.decode() for k, v in stack.redis.hgetall(f"job:{job_id}").items()}
    assert record["status"] == "completed" and record["worker"] == "image-gw" and record["steps"] == "2"
    assert record["outputs"] == json.dumps([f"ryla/{job_id}_0.png"]) and record["bucket"] == "sdxl_image_fast"
    assert (stack.root / "data" / "storage" / "sdxl_image_fast" / "ryla" / f"{job_id}_0.png").is_file()


def test_wan_endpoints_return_animated_webp_with_the_requested_frames(stack):
    requests = {
        "/wan2.6": {"prompt": "waves at night", "width": 96, "height": 64, "length": 5, "fps": 8, "seed": 3},
        "/wan2.6-i2v": {"prompt": "she turns", "reference_image": image_uri((90, 60)), "width": 96,
                        "height": 64, "length": 9, "steps": 2, "cfg": 5.0},
        "/wan2.6-r2v": {"prompt": "she walks", "reference_images": [image_uri(), image_uri((64, 64), fmt="JPEG")],
                        "num_frames": 5, "width": 64, "height": 96},
    }
    with stack.gateway.client() as http:
        responses = {path: http.post(path, json=body) for path, body in requests.items()}
    for path, response in responses.items():
        assert response.status_code == 200, (path, response.text, stack.workers[1].output())
        assert response.headers["content-type"] == "image/webp"
        clip = decoded(response)
        body = requests[path]
        assert clip.format == "WEBP" and clip.is_animated, path
        assert clip.n_frames == body.get("length", body.get("num_frames")), path
        assert clip.size == (body["width"], body["height"]), path
        assert float(response.headers["X-Cost-USD"]) > 0
    assert decoded(responses["/wan2.6"]).info["duration"] == 125    # fps 8
    assert responses["/wan2.6"].headers["X-Seed"] == "3"


def test_qwen_edit_and_inpaint_endpoints_take_the_picture_and_mask_ryla_sends(stack):
    mask = image_uri((96, 64), color=(255, 255, 255))
    requests = {
        "/qwen-image-edit-2511": {"prompt": "make it blue", "source_image": image_uri((96, 64)), "steps": 2, "seed": 4},
        "/qwen-image-inpaint-2511": {"prompt": "a red door", "image": image_uri((96, 64)), "mask": mask, "steps": 2},
    }
    with stack.gateway.client() as http:
        responses = {path: http.post(path, json=body) for path, body in requests.items()}
        unmasked = http.post("/qwen-image-inpaint-2511", json={"prompt": "x", "image": image_uri((96, 64))})
    for path, response in responses.items():
        assert response.status_code == 200, (path, response.text, stack.workers[0].output())
        assert response.headers["content-type"] == "image/jpeg" and decoded(response).format == "JPEG", path
    for path, job_type in (("/qwen-image-edit-2511", b"qwen_image_edit_2511"), ("/qwen-image-inpaint-2511", b"qwen_image_inpaint_2511")):
        assert stack.redis.hget(f"job:{responses[path].headers['X-Job-Id']}", "jobType") == job_type
    assert unmasked.status_code == 400 and unmasked.json()["detail"] == "mask is required (white where to paint)"


def test_a_job_that_outlasts_the_wait_answers_303_then_202_then_200(stack):
    zero = GatewayProcess({**stack.env, "GATEWAY_WAIT_SECONDS": "0"}, stack.root / "gateway-zero.log").start()
    video = stack.workers[1]
    try:
        with zero.client() as http:
            video.proc.send_signal(signal.SIGSTOP)      # the job stays queued while we look at it
            try:
                posted = http.post("/wan2.6", json={"prompt": "rain", "width": 64, "height": 64, "length": 5})
                assert posted.status_code == 303, posted.text
                location = posted.headers["location"]
                assert location == f"/results/{posted.headers['X-Job-Id']}"
                running = http.get(location)
                assert running.status_code == 202 and running.json()["status"] == "queued"
                assert running.headers["location"] == location and running.headers["retry-after"] == "1"
            finally:
                video.proc.send_signal(signal.SIGCONT)
            deadline = time.monotonic() + 120
            while (done := http.get(location)).status_code == 202 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert done.status_code == 200 and done.headers["content-type"] == "image/webp"
            assert decoded(done).n_frames == 5
            # What RYLA's client does: follow the 303 and poll; here the job is done already.
            again = http.post("/wan2.6", json={"prompt": "rain", "width": 64, "height": 64, "length": 5},
                              follow_redirects=True)
            assert again.status_code in (200, 202)
            assert http.get("/results/" + str(uuid.uuid4())).status_code == 404
    finally:
        zero.stop()


def test_a_failed_job_answers_with_its_error(stack):
    prefix, _, data = image_uri((96, 64)).partition(",")
    truncated = f"{prefix},{data[:120]}"             # a valid PNG header, no pixels: the worker fails it
    with stack.gateway.client() as http:
        response = http.post("/wan2.6-i2v", json={"prompt": "x", "reference_image": truncated, "length": 5})
    assert response.status_code == 500, response.text
    assert response.json()["detail"].startswith("the job failed: ") and "reference image" in response.json()["detail"]
    record = stack.redis.hgetall(f"job:{response.headers['X-Job-Id']}")
    assert record[b"status"] == b"failed"


def test_twenty_concurrent_requests_each_get_their_own_result(stack):
    async def one(http: httpx.AsyncClient, i: int) -> tuple[int, httpx.Response]:
        # RYLA's client: follow a 303 to the result URL and poll it while it answers 202.
        response = await http.post("/sdxl-turbo", json={"prompt": f"lighthouse number {i}", "seed": 1000 + i,
                                                        "width": 64, "height": 64 + 8 * (i % 4)})
        while response.status_code == 202:
            await asyncio.sleep(0.2)
            response = await http.get(response.headers["location"])
        return i, response

    async def all_of_them():
        async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=180, follow_redirects=True) as http:
            return await asyncio.gather(*(one(http, i) for i in range(20)))

    results = asyncio.run(all_of_them())
    job_ids = set()
    for i, response in results:
        assert response.status_code == 200, response.text
        assert response.headers["X-Seed"] == str(1000 + i)
        assert decoded(response).size == (64, 64 + 8 * (i % 4))
        job_ids.add(response.headers["X-Job-Id"])
        payload = stack.redis.hget(f"job:{response.headers['X-Job-Id']}", "seeds")
        assert json.loads(payload) == [1000 + i]
    assert len(job_ids) == 20


def test_a_gateway_killed_mid_request_leaves_no_job_stuck(stack):
    victim = GatewayProcess(stack.env, stack.root / "gateway-victim.log").start()
    key = uuid.uuid4().hex
    job_id = str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"wan2.6\n{key}"))
    body = {"prompt": "a storm", "width": 64, "height": 64, "length": 5, "seed": 9}
    video = stack.workers[1]
    outcome: dict = {}

    def request() -> None:
        try:
            with victim.client() as http:
                outcome["response"] = http.post("/wan2.6", json=body, headers={"Idempotency-Key": key})
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    video.proc.send_signal(signal.SIGSTOP)
    try:
        thread = threading.Thread(target=request)
        thread.start()
        wait_for(stack.redis, job_id, statuses=("queued",), timeout=30)
        victim.kill9()
        thread.join(30)
    finally:
        video.proc.send_signal(signal.SIGCONT)
    assert "error" in outcome and "response" not in outcome
    record = wait_for(stack.redis, job_id, timeout=120)
    assert record["status"] == "completed" and record["attempts"] == "1"
    with stack.gateway.client() as http:          # another gateway process serves the result URL
        result = http.get(f"/results/{job_id}")
        assert result.status_code == 200 and decoded(result).n_frames == 5
        retried = http.post("/wan2.6", json=body, headers={"Idempotency-Key": key})
    assert retried.status_code == 200 and retried.headers["X-Job-Id"] == job_id and retried.headers["X-Seed"] == "9"
    assert stack.redis.hget(f"job:{job_id}", "attempts") == b"1"     # joined, not queued again


def test_health_reports_readiness_per_model_and_endpoint(stack):
    with stack.gateway.client() as http:
        health = http.get("/health")
    assert health.status_code == 200, health.text
    report = health.json()
    assert report["status"] == "ready" and report["gpu_type"] == "test-gpu"
    assert sorted(report["models"]) == ["lustify_sdxl", "qwen_image_edit_2511", "wan_2_1_1_3b", "wan_2_1_i2v_14b_480p",
                                        "wan_2_1_vace_1_3b"]
    assert not any(state.startswith("unavailable") for state in report["models"].values())
    assert report["endpoints"]["wan2.6"] == {"served": True, "ready": True, "job_type": "video_fast",
                                             "model": "wan_2_1_1_3b"}
    assert report["endpoints"]["qwen-image-inpaint-2511"]["served"] is True
    assert report["endpoints"]["flux-dev"] == {"served": False, "ready": False, "needs": "a Flux Dev job type and model"}
