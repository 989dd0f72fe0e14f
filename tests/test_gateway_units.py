"""The gateway's parts without workers: the catalog's `ryla` section, payload `params`, settings, the
Supabase read, readiness following the catalog, and the orchestrator supervising the gateway."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
import redis.asyncio
import yaml

import dual_orchestrator
from gateway.app import readiness
from gateway.settings import GatewaySettings
from storage import SupabaseStorage, StorageError
from tests.supabase_standin import SupabaseStandin
from tests.worker_harness import contract_payload
from tools.small_catalog import small_catalog, write_small_job_types
from workers.config import ConfigError, Settings, load_catalog
from workers.job import JobRejected, parse_job
from workers.supervisor import State, Supervisor


def catalog_with(tmp_path, ryla=None, job_types=None):
    path = write_small_job_types(tmp_path, width=96, height=96)
    raw = yaml.safe_load(path.read_text())
    raw["ryla"] = ryla if ryla is not None else raw["ryla"]
    raw["job_types"].update(job_types or {})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_the_ryla_section_is_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"ryla.flux.job_type: unknown job type 'flux_dev'"):
        load_catalog(catalog_with(tmp_path, {"flux": {"job_type": "flux_dev", "output": "jpeg"}}))
    with pytest.raises(ConfigError, match=r"ryla.Bad/Name: an endpoint name"):
        load_catalog(catalog_with(tmp_path, {"Bad/Name": {"job_type": "video_fast", "output": "webp"}}))
    with pytest.raises(ConfigError, match=r"ryla.wan2.output"):
        load_catalog(catalog_with(tmp_path, {"wan2": {"job_type": "video_fast", "output": "gif"}}))
    with pytest.raises(ConfigError, match=r"ryla.wan2.output: video_fast makes videos, answered as webp or mp4, not jpeg"):
        load_catalog(catalog_with(tmp_path, {"wan2": {"job_type": "video_fast", "output": "jpeg"}}))
    pending = load_catalog(catalog_with(tmp_path, {"flux": {"job_type": "flux_dev", "output": "jpeg", "needs": "Flux"}}))
    assert pending.ryla["flux"].needs == "Flux" and pending.job_type("flux_dev") is None


def test_an_endpoint_serves_once_its_job_type_lands(tmp_path, redis_server):
    future = {"future-model": {"job_type": "future_type", "output": "jpeg", "needs": "a future model"}}
    before = load_catalog(catalog_with(tmp_path / "before", future))
    spec = {**yaml.safe_load(write_small_job_types(tmp_path / "raw").read_text())["job_types"]["sdxl_image_fast"]}
    spec.pop("name", None)
    after = load_catalog(catalog_with(tmp_path / "after", future, job_types={"future_type": spec}))

    async def endpoint(catalog) -> dict:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            return json.loads((await readiness(catalog, client, "cpu")).body)["endpoints"]["future-model"]
        finally:
            await client.aclose()

    assert asyncio.run(endpoint(before)) == {"served": False, "ready": False, "needs": "a future model"}
    served = asyncio.run(endpoint(after))
    assert served["served"] is True and served["job_type"] == "future_type" and served["ready"] is False


def test_params_set_size_steps_and_guidance_within_the_job_types_bounds(tmp_path):
    catalog = small_catalog(tmp_path, width=96, height=96)
    job = parse_job(contract_payload(params={"width": 128, "height": 64, "steps": 7, "guidance": 3}), catalog)
    assert (job.width, job.height, job.steps, job.guidance) == (128, 64, 7, 3.0)
    plain = parse_job(contract_payload(), catalog)
    assert (plain.width, plain.height, plain.steps, plain.guidance) == (96, 96, 2, 6.0)
    for params, message in (({"width": 200}, "larger than"), ({"width": 100}, "multiples of 8"),
                            ({"steps": 0}, "steps must be between 1 and 50"), ({"guidance": 31}, "guidance must be"),
                            ({"guidance": True}, "guidance must be"), ("big", "params must be a JSON object")):
        with pytest.raises(JobRejected, match=message):
            parse_job(contract_payload(params=params), catalog)


def test_sizes_follow_the_model_familys_multiple():
    from gateway.endpoints import GatewayError, RylaRequest, job_inputs
    from workers.submit import new_payload

    catalog = load_catalog()
    qwen = catalog.job_types["qwen_image_2512"]
    for ratio in ("4:3", "21:9", "9:16"):    # rounded to 16 for Qwen-Image, as its pipeline needs
        inputs = job_inputs(catalog, qwen, RylaRequest(prompt="a woman", aspect_ratio=ratio), Path("/nonexistent"))
        job = parse_job(new_payload(catalog, qwen.name, "a woman", "ryla", num_images=1, **inputs), catalog)
        assert job.width % 16 == 0 and job.height % 16 == 0 and job.width * job.height <= 1024 * 1024, (ratio, job)
    with pytest.raises(GatewayError, match="width 1176 must be a multiple of 16 for qwen_image_2512"):
        job_inputs(catalog, qwen, RylaRequest(prompt="x", width=1176, height=880), Path("/nonexistent"))
    sdxl = job_inputs(catalog, catalog.job_types["sdxl_image_fast"], RylaRequest(prompt="x", width=1000, height=1048),
                      Path("/nonexistent"))
    assert sdxl["params"] == {"width": 1000, "height": 1048}      # SDXL takes multiples of 8
    with pytest.raises(JobRejected, match="multiples of 16 for z_image_turbo, got 1000x1000"):
        parse_job(contract_payload("z_image_turbo", params={"width": 1000, "height": 1000}), catalog)


def test_gateway_settings(tmp_path):
    base = {"MODELS_DIR": str(tmp_path)}
    settings = GatewaySettings.from_env(base)
    assert (settings.enabled, settings.host, settings.port, settings.token) == (False, "127.0.0.1", 8000, None)
    assert settings.loras_dir == tmp_path / "loras"       # the workers' folder (Settings.lora_folder)
    assert GatewaySettings.from_env({**base, "LORAS_DIR": "/srv/loras"}).loras_dir == Path("/srv/loras")
    assert GatewaySettings.from_env({**base, "GATEWAY_HOST": "::1"}).host == "::1"
    with pytest.raises(ConfigError, match="set GATEWAY_TOKEN"):
        GatewaySettings.from_env({**base, "GATEWAY_HOST": "0.0.0.0"})
    assert GatewaySettings.from_env({**base, "GATEWAY_HOST": "0.0.0.0", "GATEWAY_TOKEN": "t"}).token == "t"
    with pytest.raises(ConfigError, match="GATEWAY_USER_ID"):
        GatewaySettings.from_env({**base, "GATEWAY_USER_ID": "../x"})
    with pytest.raises(ConfigError, match="GATEWAY_MAX_QUEUE_DEPTH"):
        GatewaySettings.from_env({**base, "GATEWAY_MAX_QUEUE_DEPTH": "0"})


def test_supabase_storage_reads_back_what_it_uploaded():
    with SupabaseStandin(service_key="k") as cloud:
        store = SupabaseStorage(cloud.url, "k", max_attempts=1)
        path = store.upload("video_fast", "ryla", "job_thumb.jpg", b"jpeg bytes", "image/jpeg")
        assert store.read("video_fast", path) == b"jpeg bytes"
        assert cloud.requests[-1].method == "GET" and cloud.requests[-1].headers["authorization"] == "Bearer k"
        with pytest.raises(StorageError, match="HTTP 404") as missing:
            store.read("video_fast", "ryla/none.jpg")
        assert not missing.value.retryable
        with pytest.raises(StorageError, match="not 'userId/filename'"):
            store.read("video_fast", "a/b/c")


def test_the_orchestrator_supervises_the_gateway_when_enabled(tmp_path, redis_server):
    env = {"REDIS_URL": redis_server.url, "DATA_DIR": str(tmp_path), "MODELS_DIR": str(tmp_path)}
    settings = Settings.from_env(env)
    assert dual_orchestrator._gateway_spec(settings, env) is None
    from tests.conftest import REPO, free_port

    port = free_port()
    spec = dual_orchestrator._gateway_spec(settings, {**env, "GATEWAY_ENABLED": "1", "GATEWAY_PORT": str(port),
                                                      "PYTHONPATH": str(REPO)})
    supervisor = Supervisor([spec], run_dir=tmp_path / "run")
    supervisor.start()
    try:
        deadline = time.monotonic() + 60
        while supervisor.state("gateway") is not State.RUNNING and time.monotonic() < deadline:
            supervisor.tick()
            time.sleep(0.05)
        assert supervisor.state("gateway") is State.RUNNING
        answer = httpx.post(f"http://127.0.0.1:{port}/flux", json={"prompt": "x"})   # ready means serving
        assert answer.status_code == 501
    finally:
        supervisor.stop(grace=10)
    assert supervisor.status()["gateway"]["last_exit"] in (0, -15)   # uvicorn re-raises the SIGTERM it handled


def test_a_named_lora_goes_to_the_job_on_models_that_take_loras(tmp_path):
    from gateway.endpoints import GatewayError, RylaRequest, job_inputs
    from workers.job import LORA_FAMILIES
    from workers.submit import new_payload

    catalog = load_catalog()
    spec = next(s for s in catalog.job_types.values() if catalog.models[s.model].family in LORA_FAMILIES)
    (tmp_path / "character-known.safetensors").write_bytes(b"weights")
    request = RylaRequest(prompt="a portrait", lora_id="known", lora_strength=0.8)
    inputs = job_inputs(catalog, spec, request, tmp_path)
    assert inputs["loras"] == [{"name": "character-known", "weight": 0.8}]
    job = parse_job(new_payload(catalog, spec.name, "a portrait", "ryla", num_images=1, **inputs), catalog)
    assert [(lora.name, lora.weight) for lora in job.loras] == [("character-known", 0.8)]
    with pytest.raises(GatewayError, match="LoRA character-other.safetensors not found"):
        job_inputs(catalog, spec, RylaRequest(prompt="x", lora_id="other"), tmp_path)
    with pytest.raises(GatewayError, match=r"not served for video_fast \(wan models\)") as refused:
        job_inputs(catalog, catalog.job_types["video_fast"], request, tmp_path)
    assert refused.value.status == 501


def test_a_model_serves_unless_its_worker_says_unavailable():
    from gateway.app import serves

    assert serves("loaded") and serves("resident, 0.01 GiB") and serves("not loaded")
    assert not serves(None) and not serves("unavailable: no checkpoint at /models/x")
