"""Video job inputs (workers/job.py: numFrames, referenceImage(s)) and video outputs (workers/media.py:
H.264 MP4 through the imageio-ffmpeg binary, JPEG thumbnail)."""
from __future__ import annotations

import io
import json
import subprocess

import numpy as np
import pytest
from PIL import Image

from workers.config import load_catalog
from workers.job import JobRejected, parse_job
from workers.media import encode_jpeg, encode_mp4

CATALOG = load_catalog()
PNG = "data:image/png;base64,iVBORw0KGgo="


def payload(job_type, **extra):
    return {"jobId": "job-1", "jobType": job_type, "userId": "user-1", "prompt": "waves", **extra}


def rejected(raw) -> str:
    with pytest.raises(JobRejected) as info:
        parse_job(raw, CATALOG)
    assert info.value.job_id == "job-1"
    return info.value.reason


def test_video_jobs_carry_frames_and_fps_and_may_ask_for_fewer_frames():
    job = parse_job(payload("video_fast"), CATALOG)
    assert (job.frames, job.fps, job.num_images, job.reference_images) == (81, 16, 1, ())
    assert parse_job(payload("video_high", metadata={"num_frames": 49}), CATALOG).frames == 49
    assert parse_job(payload("image_fast", numFrames=9), CATALOG).frames == 1     # images ignore it
    assert parse_job(payload("sdxl_image_fast"), CATALOG).frames is None
    assert "number of frames must be between 1 and 81, got 97" in rejected(payload("video_fast", numFrames=97))
    assert "number of frames must be an integer" in rejected(payload("video_fast", numFrames="many"))


def test_image_to_video_takes_one_reference_under_several_names():
    for name in ("referenceImage", "reference_image", "initImage", "imageUrl", "image"):
        job = parse_job(payload("video_i2v_fast", **{name: PNG}), CATALOG)
        assert job.reference_images == (PNG,) and job.init_image is None
    job = parse_job(payload("video_i2v_high", metadata={"referenceImage": "https://example.test/a.png"}), CATALOG)
    assert job.reference_images == ("https://example.test/a.png",)
    assert "needs a reference image (referenceImage" in rejected(payload("video_i2v_fast"))
    assert "referenceImage must be an http(s) URL" in rejected(payload("video_i2v_fast", referenceImage="file:///etc/passwd"))
    assert "referenceImage must be an https URL" in rejected(payload("video_i2v_fast", referenceImage=5))


def test_reference_to_video_takes_one_to_three_references():
    refs = [PNG, "https://example.test/b.png"]
    assert parse_job(payload("video_r2v", referenceImages=refs), CATALOG).reference_images == tuple(refs)
    assert parse_job(payload("video_r2v", metadata={"reference_images": refs[:1]}), CATALOG).reference_images == (PNG,)
    assert parse_job(payload("video_r2v", referenceImage=PNG), CATALOG).reference_images == (PNG,)
    assert "needs 1 to 3 reference images" in rejected(payload("video_r2v"))
    assert rejected(payload("video_r2v", referenceImages=[])).endswith("got 0")
    assert rejected(payload("video_r2v", referenceImages=[PNG] * 4)).endswith("got 4")
    assert rejected(payload("video_r2v", referenceImages=PNG)).endswith("got str")
    assert "referenceImages[1] must be an http(s) URL" in rejected(payload("video_r2v", referenceImages=[PNG, "ftp://x"]))


def test_encode_mp4_writes_browser_playable_h264(tmp_path):
    frames = [np.full((48, 80, 3), (i * 50, 100, 200 - i * 40), np.uint8) for i in range(5)]
    data = encode_mp4(frames, fps=16)
    assert data[4:8] == b"ftyp" and data.find(b"moov") < data.find(b"mdat")    # +faststart: index first
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_entries",
                          "stream=codec_name,profile,pix_fmt,width,height,r_frame_rate,nb_read_frames", "-of", "json",
                          str(path)], capture_output=True, text=True, check=True)
    stream = json.loads(out.stdout)["streams"][0]
    assert stream == {"codec_name": "h264", "profile": "High", "width": 80, "height": 48, "pix_fmt": "yuv420p",
                      "r_frame_rate": "16/1", "nb_read_frames": "5"}


def test_encode_mp4_pads_odd_sizes_and_refuses_bad_frames(tmp_path):
    path = tmp_path / "odd.mp4"
    path.write_bytes(encode_mp4([np.zeros((33, 45, 3), np.uint8)] * 2, fps=8))
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=width,height", "-of", "csv=p=0", str(path)],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "46,34"   # yuv420p needs even sizes
    with pytest.raises(ValueError, match="at least one frame"):
        encode_mp4([], fps=16)
    with pytest.raises(ValueError, match="one size"):
        encode_mp4([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 16, 3), np.uint8)], fps=16)
    with pytest.raises(ValueError, match="fps 0"):
        encode_mp4([np.zeros((8, 8, 3), np.uint8)], fps=0)


def test_thumbnail_is_a_jpeg_of_the_frame():
    frame = np.zeros((40, 64, 3), np.uint8)
    frame[:, :32] = (250, 10, 10)
    with Image.open(io.BytesIO(encode_jpeg(frame))) as image:
        assert image.format == "JPEG" and image.size == (64, 40)
        assert image.getpixel((8, 20))[0] > 200 and image.getpixel((56, 20))[0] < 50
