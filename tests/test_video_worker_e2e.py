"""The video worker end to end: LPUSH a CONTRACT.md payload onto wan_queue → a real worker subprocess
(tiny random-weight Wan checkpoints loaded from disk) → PNGs / an H.264 MP4 and its thumbnail in
storage → the callback JSON. Bad inputs, a genuine out-of-memory error and a kill -9 mid-video."""
from __future__ import annotations

import base64
import io
import json
import resource
import subprocess

import pytest
from PIL import Image

from tests.supabase_standin import SupabaseStandin
from tests.worker_harness import USER, WorkerProcess, WorkerStarter, contract_payload, local_callbacks, push, wait_for
from tools.small_catalog import write_small_job_types


@pytest.fixture
def make_worker(tmp_path, redis_server, tiny_sdxl, tiny_wan):
    starter = WorkerStarter(tmp_path, redis_server.url, tiny_sdxl)

    def make(job_types=None, i2v=True, vace=True, **extra) -> WorkerProcess:
        wan = {"WAN_MODEL_PATH": str(tiny_wan.t2v),
               "WAN_I2V_MODEL_PATH": str(tiny_wan.i2v if i2v else tmp_path / "no-i2v"),
               "WAN_VACE_MODEL_PATH": str(tiny_wan.vace if vace else tmp_path / "no-vace")}
        return starter.start("video", job_types, **wan, **extra)

    yield make
    starter.stop_all()


def image_uri(size=(48, 80), color=(200, 30, 30), fmt="PNG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def video_payload(job_type="video_fast", **extra) -> dict:
    return contract_payload(job_type, format="video", numImages=1, metadata={"num_images": 1, "queue": "wan_queue"},
                            modelVariant="wan_2_1_1_3b", **extra)


def probe(data: bytes, tmp_path) -> dict:
    path = tmp_path / "probe.mp4"
    path.write_bytes(data)
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                          "stream=codec_name,pix_fmt,width,height,r_frame_rate,nb_read_frames", "-of", "json",
                          str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["streams"][0]



def test_images_videos_i2v_and_r2v_as_the_contract_says(tmp_path, make_worker, redis_client):
    job_types = write_small_job_types(tmp_path / "catalog", steps=2, job_types={"video_i2v_fast": {"width": 96},
                                                                                "video_fast_cached": {"steps": 4}})
    with SupabaseStandin(service_key="service-key-for-tests") as cloud:
        worker = make_worker(job_types, SUPABASE_URL=cloud.url, SUPABASE_SERVICE_KEY="service-key-for-tests")
        images = contract_payload("image_fast", seed=11)
        video = video_payload(seed=5)
        i2v = video_payload("video_i2v_fast", referenceImage=image_uri((48, 80)), bucket="video_fast")
        r2v = video_payload("video_r2v", referenceImages=[image_uri(), image_uri((64, 64), (0, 90, 200), "JPEG")])
        cached = video_payload("video_fast_cached", seed=5)   # the caching tier: 4 steps, 2 of them reused
        for payload in (images, video, i2v, r2v, cached):
            push(redis_client, payload, queue="wan_queue")
        records = {p["jobType"]: wait_for(redis_client, p["jobId"]) for p in (images, video, i2v, r2v, cached)}
        assert {t: r["status"] for t, r in records.items()} == dict.fromkeys(records, "completed"), worker.output()
        assert all(r["step"] == r["steps"] == ("4" if t == "video_fast_cached" else "2") and float(r["progress"]) == 1.0
                   for t, r in records.items())
        assert "step cache plan CssC, blocks run/reused per branch {'cond': [2, 2], 'uncond': [2, 2]}" in worker.output()

        pngs = [f"{USER}/{images['jobId']}_{i}.png" for i in range(2)]
        for path in pngs:
            data, content_type = cloud.objects[f"image_fast/{path}"]
            assert content_type == "image/png" and Image.open(io.BytesIO(data)).size == (64, 64)
        assert cloud.callbacks_for(images["jobId"])[-1] == {
            "jobId": images["jobId"], "status": "completed", "imageUrls": pngs, "filePath": pngs[0], "seeds": [11, 12],
            "bucket": "image_fast"}

        for payload, bucket, size in ((video, "video_fast", (64, 64)), (i2v, "video_fast", (64, 96)),
                                      (r2v, "video_high", (64, 64)), (cached, "video_fast", (64, 64))):
            mp4, thumb = f"{USER}/{payload['jobId']}.mp4", f"{USER}/{payload['jobId']}_thumb.jpg"
            data, content_type = cloud.objects[f"{bucket}/{mp4}"]
            assert content_type == "video/mp4" and data.find(b"moov") < data.find(b"mdat")   # +faststart
            assert probe(data, tmp_path) == {"codec_name": "h264", "width": size[0], "height": size[1],
                                             "pix_fmt": "yuv420p", "r_frame_rate": "16/1", "nb_read_frames": "5"}
            data, content_type = cloud.objects[f"{bucket}/{thumb}"]
            with Image.open(io.BytesIO(data)) as picture:
                assert content_type == "image/jpeg" and picture.format == "JPEG" and picture.size == size
            bodies = cloud.callbacks_for(payload["jobId"])
            assert bodies[0] == {"jobId": payload["jobId"], "status": "processing"}
            assert bodies[-1] == {"jobId": payload["jobId"], "status": "completed", "filePath": mp4,
                                  "thumbnailPath": thumb, "seeds": bodies[-1]["seeds"], "bucket": bucket}
        assert cloud.callbacks_for(video["jobId"])[-1]["seeds"] == [5]
        uploads = cloud.requests_to("/storage/v1/object/")
        assert all(r.headers["x-upsert"] == "true" for r in uploads)


def test_bad_inputs_and_out_of_memory_fail_clearly_and_the_worker_goes_on(tmp_path, make_worker, redis_client):
    job_types = write_small_job_types(
        tmp_path / "catalog", steps=2, limits={"input_image_max_pixels": 10_000},
        job_types={"video_high": {"frames": 9},
                   # 512×512×17 frames: the VAE decode needs over 128 MB at once
                   "video_i2v_high": {"model": "wan_2_1_1_3b", "mode": "txt2video", "width": 512, "height": 512,
                                      "frames": 17, "steps": 1}})
    worker = make_worker(job_types, i2v=False)
    bad = {
        "frames not 4k+1": (video_payload("video_high", numFrames=6), "number of frames 6 must be 4k+1"),
        "frames over the type's": (video_payload(numFrames=9), "number of frames must be between 1 and 5, got 9"),
        "size": (contract_payload("image_high", params={"width": 72}), "multiples of 16 for image_high, got 72x64"),
        "no reference": (video_payload("video_r2v"), "video_r2v needs 1 to 3 reference images"),
        "undecodable reference": (video_payload("video_r2v", referenceImages=[image_uri(), "data:image/png;base64,bm8="]),
                                  "reference image 2 is not a decodable image"),
        "oversize reference": (video_payload("video_r2v", referenceImages=[image_uri((128, 128))]),
                               "reference image is 128x128 = 16384 pixels, over the 10000-pixel limit"),
        "too many references": (video_payload("video_r2v", referenceImages=[image_uri()] * 4), "got 4"),
        "no i2v checkpoint": (video_payload("video_i2v_fast", referenceImage=image_uri()),
                              "video_i2v_fast cannot run on this pod: no Wan image-to-video checkpoint at"),
    }
    for payload, _ in bad.values():
        push(redis_client, payload, queue="wan_queue")
    good = video_payload()
    push(redis_client, good, queue="wan_queue")
    assert wait_for(redis_client, good["jobId"])["status"] == "completed", worker.output()
    for label, (payload, fragment) in bad.items():
        record = wait_for(redis_client, payload["jobId"], timeout=5)
        assert record["status"] == "failed" and fragment in record["error"], (label, record)
        assert local_callbacks(tmp_path, payload["jobId"])[-1]["errorMessage"] == record["error"]
    assert "set WAN_I2V_MODEL_PATH" in wait_for(redis_client, bad["no i2v checkpoint"][0]["jobId"])["error"]

    # A real allocation failure: cap the running worker's address space a little above what it uses.
    with open(f"/proc/{worker.proc.pid}/status") as status:
        used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
    resource.prlimit(worker.proc.pid, resource.RLIMIT_AS, (used + 128 * 2**20, resource.RLIM_INFINITY))
    huge, after = video_payload("video_i2v_high"), video_payload()
    push(redis_client, huge, queue="wan_queue")
    push(redis_client, after, queue="wan_queue")
    record = wait_for(redis_client, huge["jobId"], timeout=120)
    assert record["status"] == "failed", worker.output()
    assert record["error"].startswith("out of memory generating a 17-frame 512x512 video: DefaultCPUAllocator")
    assert wait_for(redis_client, after["jobId"])["status"] == "completed", worker.output()
    assert worker.proc.poll() is None


def test_worker_killed_mid_video_loses_nothing(tmp_path, make_worker, redis_client):
    job_types = write_small_job_types(tmp_path / "slow", steps=2, job_types={"video_high": {"steps": 60}})
    first = make_worker(job_types)
    job = video_payload("video_high", bucket="video_high")
    push(redis_client, job, queue="wan_queue")
    record = wait_for(redis_client, job["jobId"], statuses=tuple(str(i) for i in range(1, 60)), field="step")
    assert record["status"] == "processing" and record["steps"] == "60"   # progress, read mid-job
    first.kill9()
    second = make_worker(job_types)       # another id: finds the job through the reaper
    record = wait_for(redis_client, job["jobId"], timeout=180)
    assert record["status"] == "completed" and record["attempts"] == "2", second.output()
    assert [b["status"] for b in local_callbacks(tmp_path, job["jobId"])].count("completed") == 1
    folder = tmp_path / "data" / "storage" / "video_high" / USER
    assert sorted(p.name for p in folder.iterdir()) == [f"{job['jobId']}.mp4", f"{job['jobId']}_thumb.jpg"]
