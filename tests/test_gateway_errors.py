"""The gateway's refusals, each as RYLA expects it ({"detail": ...}), from a running gateway process.
No worker runs here: every refusal happens before a job is queued, which the tests check too."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import uuid

import pytest
import redis
import yaml
from PIL import Image

from tests.conftest import RedisServer
from tests.gateway_harness import REPO, GatewayProcess, image_uri, sdxl_and_wan_catalog
from tests.worker_harness import worker_env

MAX_PIXELS, MAX_IMAGE_BYTES, MAX_BODY = 200 * 200, 60_000, 200_000


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, tiny_sdxl):
    root = tmp_path_factory.mktemp("gateway-errors")
    server = RedisServer(root).start()
    job_types = sdxl_and_wan_catalog(root / "catalog", width=96, height=96, steps=2, frames=9,
                                      limits={"input_image_max_pixels": MAX_PIXELS,
                                              "input_image_max_bytes": MAX_IMAGE_BYTES})
    raw = yaml.safe_load(job_types.read_text())      # a LoRA endpoint on a model the test workers serve
    raw["ryla"]["lora-only"] = {"job_type": "sdxl_image_fast", "output": "jpeg", "lora_required": True}
    job_types.write_text(yaml.safe_dump(raw, sort_keys=False))
    (root / "loras").mkdir()
    (root / "loras" / "character-known.safetensors").write_bytes(b"weights")
    env = {**worker_env(server.url, root / "data", job_types, tiny_sdxl.single_file, tiny_sdxl.folder),
           "GATEWAY_MAX_BODY_BYTES": str(MAX_BODY), "GATEWAY_MAX_QUEUE_DEPTH": "2", "LORAS_DIR": str(root / "loras"),
           "GATEWAY_WAIT_SECONDS": "0"}
    process = GatewayProcess(env, root / "gateway.log").start()
    try:
        yield type("Gateway", (), {"process": process, "env": env, "root": root,
                                   "redis": redis.Redis.from_url(server.url)})
    finally:
        process.stop()
        server.stop()


def noise_png(size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


BAD_REQUESTS = [
    ("/sdxl-lightning", {}, 400, "prompt is required"),
    ("/sdxl-lightning", {"prompt": "   "}, 400, "prompt is required"),
    ("/sdxl-lightning", [1, 2], 400, "the request body must be a JSON object"),
    ("/sdxl-lightning", {"prompt": "x", "width": "wide"}, 400, "width: Input should be a valid integer"),
    ("/sdxl-lightning", {"prompt": "x", "seed": -1}, 400, "seed: Input should be greater than or equal to 0"),
    ("/sdxl-lightning", {"prompt": "x", "width": 100}, 400, "width 100 must be a multiple of 8"),
    ("/sdxl-lightning", {"prompt": "x", "width": 512, "height": 512}, 400, "512x512 is larger than sdxl_image_fast's 96x96"),
    ("/sdxl-lightning", {"prompt": "x", "steps": 51}, 400, "steps must be between 1 and 50"),
    ("/sdxl-lightning", {"prompt": "x", "aspect_ratio": "5:1"}, 400, "aspect_ratio '5:1' is not one of"),
    ("/sdxl-lightning", {"prompt": "a loli girl"}, 400, "Prompt refused"),
    ("/sdxl-lightning", {"prompt": "x" * 2001}, 400, "prompt is 2001 characters"),
    ("/wan2.6", {"prompt": "x", "length": 6}, 400, "length 6 must be 4k+1 frames"),
    ("/wan2.6", {"prompt": "x", "length": 13}, 400, "number of frames must be between 1 and 9"),
    ("/wan2.6", {"prompt": "x", "width": 72}, 400, "width 72 must be a multiple of 16"),
    ("/wan2.6-i2v", {"prompt": "x"}, 400, "reference_image is required"),
    ("/wan2.6-i2v", {"prompt": "x", "reference_image": "data:image/png;base64,@@@"}, 400, "not valid base64"),
    ("/wan2.6-i2v", {"prompt": "x", "reference_image": base64.b64encode(b"plain text").decode()}, 400,
     "not a decodable image"),
    ("/wan2.6-r2v", {"prompt": "x"}, 400, "reference_images is required"),
    ("/wan2.6-r2v", {"prompt": "x", "reference_images": [image_uri()] * 4}, 400, "needs 1 to 3 reference images"),
    ("/sdxl-lightning", {"prompt": "x", "lora_id": "nobody"}, 404, "LoRA character-nobody.safetensors not found"),
    ("/sdxl-lightning", {"prompt": "x", "lora_name": "../secrets"}, 400, "is not a plain file name"),
    ("/no-such-model", {"prompt": "x"}, 404, "unknown endpoint /no-such-model"),
    ("/wan2.6", {"prompt": "x", "lora_id": "known"}, 501, "LoRA loading is not served for video_fast (wan models)"),
    ("/flux-dev", {"prompt": "x"}, 501, "/flux-dev is not served by this pod: it needs a Flux Dev job type"),
    ("/sdxl-instantid", {"prompt": "x"}, 501, "InstantID"),
    ("/seedvr2", {"image": "x"}, 501, "SeedVR2 upscaler"),
    ("/wan2.6-lora", {"prompt": "x", "lora_id": "known"}, 501, "LoRA loading in the Wan worker"),
    ("/lora-only", {"prompt": "x"}, 400, "/lora-only needs a LoRA: give lora_id or lora_name"),
]


@pytest.mark.parametrize("path,body,status,detail", BAD_REQUESTS, ids=[f"{r[2]}-{r[3][:30]}" for r in BAD_REQUESTS])
def test_bad_requests_get_the_status_and_detail_ryla_expects(gateway, path, body, status, detail):
    with gateway.process.client() as http:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert detail in response.json()["detail"]
    assert gateway.redis.keys("job:*") == [] and gateway.redis.llen("sdxl_queue") == 0   # nothing queued


def test_oversize_bodies_and_images_get_413(gateway):
    with gateway.process.client() as http:
        body = http.post("/sdxl-lightning", content=b'{"prompt": "' + b"x" * MAX_BODY + b'"}',
                         headers={"content-type": "application/json"})
        assert body.status_code == 413 and "over the 200000-byte limit" in body.json()["detail"]

        def chunks():      # no Content-Length: the limit holds while the body streams in
            for _ in range(30):
                yield b" " * 10_000
        streamed = http.post("/sdxl-lightning", content=chunks())
        assert streamed.status_code == 413

        heavy = http.post("/wan2.6-i2v", json={"prompt": "x", "reference_image": noise_png((150, 150))})
        assert heavy.status_code == 413 and "60000-byte limit" in heavy.json()["detail"]
        wide = http.post("/wan2.6-i2v", json={"prompt": "x", "reference_image": image_uri((300, 200))})
        assert wide.status_code == 413 and "300x200, over the 40000-pixel limit" in wide.json()["detail"]
    assert gateway.redis.keys("job:*") == []


def test_a_full_queue_answers_503_with_retry_after(gateway):
    gateway.redis.lpush("sdxl_queue", "waiting-1", "waiting-2")
    try:
        with gateway.process.client() as http:
            response = http.post("/sdxl-lightning", json={"prompt": "x"})
    finally:
        gateway.redis.delete("sdxl_queue")
    assert response.status_code == 503 and response.headers["retry-after"] == "5"   # sdxl_image_fast's 5 s
    assert "2 jobs are waiting for sdxl_queue" in response.json()["detail"]


def test_an_idempotent_retry_joins_its_job_even_when_the_queue_is_full(gateway):
    from gateway.app import IDEMPOTENCY_NAMESPACE

    key = uuid.uuid4().hex
    job_id = str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"sdxl-lightning\n{key}"))
    gateway.redis.set(f"gateway:idempotency:{job_id}", "1")      # the first request queued it
    gateway.redis.lpush("sdxl_queue", "waiting-1", "waiting-2")
    try:
        with gateway.process.client() as http:
            joined = http.post("/sdxl-lightning", json={"prompt": "x"}, headers={"Idempotency-Key": key})
            fresh = http.post("/sdxl-lightning", json={"prompt": "x"}, headers={"Idempotency-Key": uuid.uuid4().hex})
    finally:
        gateway.redis.delete("sdxl_queue", f"gateway:idempotency:{job_id}")
    assert joined.status_code == 303 and joined.headers["X-Job-Id"] == job_id   # waits for its job
    assert fresh.status_code == 503


def test_a_request_whose_enqueue_failed_keeps_its_key_when_the_job_was_queued_after_all(gateway):
    from gateway.app import IDEMPOTENCY_NAMESPACE

    key = uuid.uuid4().hex
    job_id = str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"sdxl-lightning\n{key}"))
    # Redis refuses the record's HSET (WRONGTYPE) inside the enqueue's MULTI; its LPUSH still applies.
    gateway.redis.set(f"job:{job_id}", "not a hash")
    try:
        with gateway.process.client() as http:
            failed = http.post("/sdxl-lightning", json={"prompt": "x"}, headers={"Idempotency-Key": key})
        queued = [json.loads(raw)["jobId"] for raw in gateway.redis.lrange("sdxl_queue", 0, -1)]
        kept = gateway.redis.exists(f"gateway:idempotency:{job_id}")
    finally:
        gateway.redis.delete(f"job:{job_id}", "sdxl_queue", f"gateway:idempotency:{job_id}")
    assert failed.status_code == 503 and "retry later" in failed.json()["detail"]
    assert queued == [job_id] and kept      # a retry with the key joins that job, it does not queue it again


def test_health_is_503_without_live_workers(gateway):
    with gateway.process.client() as http:
        health = http.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "degraded"
    assert health.json()["models"]["lustify_sdxl"] == "no live worker has loaded it"


def test_a_token_is_required_and_compared_exactly(gateway):
    secured = GatewayProcess({**gateway.env, "GATEWAY_TOKEN": "s3cret-token"}, gateway.root / "secured.log").start()
    try:
        with secured.client() as http:
            assert http.get("/health").status_code == 401
            assert http.post("/flux-dev", json={"prompt": "x"}).status_code == 401
            wrong = http.get("/health", headers={"Authorization": "Bearer s3cret-tokeN"})
            assert wrong.status_code == 401 and wrong.json() == {"detail": "missing or wrong bearer token"}
            assert http.get("/health", headers={"Authorization": "Basic s3cret-token"}).status_code == 401
            ok = http.post("/flux-dev", json={"prompt": "x"}, headers={"Authorization": "Bearer s3cret-token"})
            assert ok.status_code == 501
    finally:
        secured.stop()


def test_binding_beyond_loopback_without_a_token_refuses_to_start(gateway):
    env = {**os.environ, **gateway.env, "GATEWAY_HOST": "0.0.0.0", "PYTHONPATH": str(REPO)}
    env.pop("GATEWAY_TOKEN", None)
    done = subprocess.run([sys.executable, "-m", "gateway"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 78
    assert "GATEWAY_HOST=0.0.0.0 is not loopback: set GATEWAY_TOKEN" in done.stdout + done.stderr


def test_sigterm_stops_the_gateway_cleanly(gateway, tmp_path):
    other = GatewayProcess(gateway.env, tmp_path / "gateway.log").start()
    assert other.stop() == 0, other.output()     # an ordinary stop, not a crash (-15) for the supervisor
