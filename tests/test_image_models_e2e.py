"""The image worker end to end with the new models: LPUSH payloads onto sdxl_queue → a real worker
subprocess (tiny random-weight SDXL, Qwen-Image, Qwen-Image-Edit and Z-Image from disk, a LoRA folder,
a VRAM budget that holds SDXL and one other model) → PNGs in storage, callbacks, the job records'
residency reports, the heartbeat's model states. Bad inputs fail with their reason."""
from __future__ import annotations

import base64
import io
import json
import time

from PIL import Image

from tests.fixtures.tiny_image_models import LIGHTNING
from tests.worker_harness import USER, WorkerProcess, contract_payload, push, wait_for, worker_env
from tools.small_catalog import write_small_job_types
from workers.config import load_catalog
from workers.metrics import health


def image_uri(size=(64, 64), color=(200, 30, 30), mode="RGB") -> str:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def payload(job_type, metadata=None, **extra):
    return contract_payload(job_type, numImages=1, metadata={"num_images": 1, "queue": "sdxl_queue", **(metadata or {})},
                            modelVariant=job_type, isSDXL=False, seed=3, **extra)


def test_new_image_job_types_through_redis(tmp_path, redis_server, redis_client, tiny_sdxl, tiny_image_models):
    assert (tiny_image_models.loras / f"{LIGHTNING}.safetensors").is_file()
    env = worker_env(redis_server.url, tmp_path / "data", write_small_job_types(tmp_path / "catalog", steps=2),
                     tiny_sdxl.single_file, tiny_sdxl.folder, QWEN_IMAGE_MODEL_PATH=str(tiny_image_models.qwen),
                     QWEN_IMAGE_EDIT_MODEL_PATH=str(tiny_image_models.qwen_edit),
                     Z_IMAGE_MODEL_PATH=str(tiny_image_models.zimage), LORAS_DIR=str(tiny_image_models.loras),
                     IMAGE_VRAM_BUDGET_GIB="0.013")   # tiny SDXL (0.011 GiB) and one of the others
    worker = WorkerProcess("image", env, tmp_path / "image.log").start()
    try:
        good = [
            payload("z_image_turbo"),
            payload("qwen_image_2512_fast"),
            payload("qwen_image_2512", loras=[{"name": "qwen-character", "weight": 0.7}]),
            payload("qwen_image_inpaint_2511", initImage=image_uri(), maskImage=image_uri(color=255, mode="L")),
            payload("qwen_image_edit_2511", referenceImages=[image_uri((48, 80))], params={"guidance": 1.0}),
            payload("sdxl_image_fast"),
        ]
        bad = {
            "mask size": (payload("qwen_image_inpaint_2511", initImage=image_uri(), maskImage=image_uri((32, 32))),
                          "the mask is 32x32, the image 64x64"),
            "unknown LoRA": (payload("z_image_turbo", loras=[{"name": "nobody"}]), "unknown LoRA 'nobody'"),
            "wrong family": (payload("z_image_turbo", metadata={"loras": [{"name": "qwen-character"}]}),
                             "does not fit z_image"),
            "no picture": (payload("qwen_image_edit_2511", referenceImages=["data:image/png;base64,AAAA"]),
                           "picture to edit is not a decodable image"),
        }
        push(redis_client, good[0])   # alone first: its report is then certain (later ones may jump the queue)
        wait_for(redis_client, good[0]["jobId"], timeout=180)
        for body in good[1:] + [b for b, _ in bad.values()]:
            push(redis_client, body)
        records = {p["jobType"]: wait_for(redis_client, p["jobId"], timeout=180) for p in good}
        assert {t: r["status"] for t, r in records.items()} == dict.fromkeys(records, "completed"), worker.output()
        for body in good:
            path = tmp_path / "data" / "storage" / body["jobType"] / USER / f"{body['jobId']}_0.png"
            with Image.open(path) as image:   # an edit keeps its picture's shape at the type's pixel count
                assert image.size == ((48, 80) if body["jobType"] == "qwen_image_edit_2511" else (64, 64))
        # Loaded at start: SDXL and Qwen-Image (they fit the budget together); Z-Image on its first job,
        # making room by moving out the least recently used.
        first = records["z_image_turbo"]
        assert first["residency"] == "cold" and json.loads(first["evicted"]) == ["lustify_sdxl"]
        assert all(r["residency"] in ("cold", "warm", "resident") and float(r["swap_ms"]) >= 0 for r in records.values())
        for label, (body, fragment) in bad.items():
            record = wait_for(redis_client, body["jobId"], timeout=60)
            assert record["status"] == "failed" and fragment in record["error"], (label, record)
        # /health shows what is resident: the heartbeat's states. The last failed job's swap may land
        # in the next heartbeat, so compare while two heartbeats in a row agree.
        for _ in range(20):
            states = json.loads(redis_client.get(f"worker:{env['WORKER_ID']}"))["models"]
            _, report = health({"image": {"state": "running"}}, redis_client, load_catalog(env["JOB_TYPES_FILE"]))
            if json.loads(redis_client.get(f"worker:{env['WORKER_ID']}"))["models"] == states:
                break
            time.sleep(0.5)
        assert set(states) == {"lustify_sdxl", "qwen_image_2512", "qwen_image_edit_2511", "z_image_turbo"}
        assert report["workers"]["image"][0]["models"] == states
        resident = [key for key, state in states.items() if state.startswith("resident")]
        assert 1 <= len(resident) < 4 and all(s.startswith(("resident", "warm")) for s in states.values()), states
    finally:
        assert worker.stop() == 0
