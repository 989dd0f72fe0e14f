"""Payload → Job: every bad input is a JobRejected with a message the frontend can show."""
import json
from pathlib import Path

import pytest
import yaml

from workers.config import ConfigError, load_catalog
from workers.job import JobRejected, job_id_of, parse_job

CATALOG = load_catalog()


def payload(**overrides):
    base = {"jobId": "0b7e7c1e-4f7e-4f0e-9d1a-1a2b3c4d5e6f", "jobType": "sdxl_image_fast",
            "userId": "5f1b9d2c-aaaa-bbbb-cccc-000000000001", "prompt": "a lighthouse at dusk",
            "metadata": {"queue": "sdxl_queue"}}
    base.update(overrides)
    return base


def rejected(raw) -> JobRejected:
    with pytest.raises(JobRejected) as info:
        parse_job(raw, CATALOG)
    return info.value


def test_contract_payload_parses_with_defaults():
    job = parse_job(json.dumps(payload(extraField={"ignored": True})), CATALOG)
    assert (job.width, job.height, job.steps, job.guidance) == (1024, 1024, 15, 6.0)
    assert job.num_images == 6 and len(job.seeds) == 6 and job.seeds[1] == job.seeds[0] + 1
    assert job.bucket == "sdxl_image_fast"
    assert job.negative_prompt == CATALOG.defaults.negative_prompt


def test_image_count_order_metadata_then_numimages_then_default():
    assert parse_job(payload(numImages=2, metadata={"num_images": 3}), CATALOG).num_images == 3
    assert parse_job(payload(numImages=2), CATALOG).num_images == 2
    assert parse_job(payload(jobType="video_fast", numImages=4), CATALOG).num_images == 1


def test_seed_negative_prompt_and_seed_bucket_name():
    job = parse_job(payload(seed=42, negativePrompt="ugly", bucket="sdxl_fast"), CATALOG)
    assert job.seeds[:2] == (42, 43) and job.negative_prompt == "ugly" and job.bucket == "sdxl_fast"
    job = parse_job(payload(metadata={"seed": 7, "negative_prompt": "x"}), CATALOG)
    assert job.seeds[0] == 7 and job.negative_prompt == "x"


def test_img2img_needs_an_image_and_takes_strength():
    exc = rejected(payload(jobType="sdxl_img2img"))
    assert "init image" in exc.reason and exc.job_id
    job = parse_job(payload(jobType="sdxl_img2img", initImage="data:image/png;base64,AAAA"), CATALOG)
    assert job.strength == 0.75 and job.init_image.startswith("data:")
    assert "strength" in rejected(payload(jobType="sdxl_img2img", initImage="https://x/y.png", strength=1.5)).reason
    assert "initImage" in rejected(payload(jobType="sdxl_img2img", initImage="file:///etc/passwd")).reason


@pytest.mark.parametrize("raw, fragment, has_id", [
    (b"{not json", "not valid JSON", False),
    (b"\xff\xfe", "not valid JSON", False),
    (b'{"jobId": "a", "n": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}", "not valid JSON", False),  # too deep
    (b'{"jobId": "a", "n": ' + b"9" * 5000 + b"}", "not valid JSON", False),    # over Python's 4,300 digits
    (json.dumps([1, 2]), "JSON object", False),
    (json.dumps(payload(jobId=None)), "no jobId", False),
    (json.dumps(payload(jobId="../../etc")), "jobId", False),
    (json.dumps(payload(userId=None)), "no userId", True),
    (json.dumps(payload(jobType=None)), "no jobType", True),
    (json.dumps(payload(jobType="sdxl_image_ultra")), "unknown jobType", True),
    (json.dumps(payload(prompt="x" * 2001)), "2000-character limit", True),
    (json.dumps(payload(prompt=["list"])), "prompt must be a string", True),
    (json.dumps(payload(userId="../other-user")), "userId", True),
    (json.dumps(payload(userId="a/b")), "userId", True),
    (json.dumps(payload(userId="nul\x00byte")), "userId", True),
    (json.dumps(payload(bucket="..")), "bucket", True),
    (json.dumps(payload(bucket="video_fast")), "not allowed", True),
    (json.dumps(payload(numImages=0)), "between 1 and 8", True),
    (json.dumps(payload(numImages=10**9)), "between 1 and 8", True),
    (json.dumps(payload(numImages="many")), "integer", True),
    (json.dumps(payload(numImages=True)), "integer", True),
    (json.dumps(payload(seed=-1)), "seed", True),
    (json.dumps(payload(metadata="junk")), "metadata", True),
])
def test_bad_payloads_are_rejected_with_a_reason(raw, fragment, has_id):
    exc = rejected(raw)
    assert fragment in exc.reason
    assert (exc.job_id is not None) == has_id


def test_the_prompt_policy_applies_in_the_worker_too():
    from workers.safety import check_prompt

    prompt = "nude photo of a 12 yo"
    assert check_prompt(prompt) is not None
    assert rejected(payload(prompt=prompt)).reason == check_prompt(prompt)
    assert parse_job(payload(prompt="a lighthouse at dusk, 12 boats"), CATALOG).prompt


def test_oversize_payload_is_rejected_before_parsing():
    big = json.dumps(payload(prompt="x" * (CATALOG.limits.payload_max_bytes + 1)))
    assert "over the" in rejected(big).reason


def test_job_id_of_is_best_effort():
    assert job_id_of(json.dumps(payload())) == payload()["jobId"]
    assert job_id_of(b"garbage") is None and job_id_of(b"[]") is None
    assert job_id_of(b"[" * 100_000) is None and job_id_of(b'{"jobId": "a", "n": ' + b"9" * 5000 + b"}") is None


def test_catalog_has_every_contract_job_type():
    contract = {"sdxl_image_fast", "sdxl_image_high", "sdxl_image_premium", "sdxl_img2img",
                "image_fast", "image_high", "video_fast", "video_high"}
    assert contract <= set(CATALOG.job_types)
    assert CATALOG.queue_of("sdxl_image_fast") == "sdxl_queue" and CATALOG.queue_of("video_high") == "wan_queue"
    for spec in CATALOG.job_types.values():
        if spec.content == "video":
            assert (spec.frames - 1) % 4 == 0, "Wan needs 4k+1 frames"
    assert CATALOG.job_types["sdxl_image_premium"].fallback == "image_high"
    assert CATALOG.job_types["sdxl_img2img"].fallback is None


@pytest.mark.parametrize("mutate, fragment", [
    (lambda d: d["job_types"]["sdxl_image_fast"].update(steps=0), "job_types.sdxl_image_fast.steps"),
    (lambda d: d["job_types"]["sdxl_image_fast"].update(model="nope"), "unknown model 'nope'"),
    (lambda d: d["job_types"]["sdxl_image_fast"].update(fallback="nope"), "fallback"),
    (lambda d: d["job_types"]["sdxl_image_fast"].update(width=1000 + 1), "width"),
    (lambda d: d["job_types"]["video_fast"].update(width=488), "job_types.video_fast: 488x832 is not a multiple of 16"),
    (lambda d: d["job_types"]["sdxl_image_fast"].update(colour="red"), "colour"),
    (lambda d: d["job_types"]["sdxl_image_fast"].update(buckets=["../x"]), "safe path segment"),
    (lambda d: d["limits"].pop("prompt_max_chars"), "limits.prompt_max_chars"),
])
def test_a_wrong_catalog_names_the_key(tmp_path: Path, mutate, fragment):
    data = yaml.safe_load(Path("job_types.yaml").read_text())
    mutate(data)
    path = tmp_path / "job_types.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_catalog(path)
    assert fragment in str(info.value)
