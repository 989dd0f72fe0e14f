"""Waiting for a job (async, on its `job:{id}` record in Redis) and turning its stored outputs into
the bytes RYLA expects: JPEG images, animated WebP clips (from the worker's MP4), PNG, MP4."""
from __future__ import annotations

import asyncio
import io
import json
import subprocess
import time

import numpy as np
from PIL import Image

from storage import Storage
from workers.media import ffmpeg_binary
from workers.queue import job_key

TERMINAL = ("completed", "failed")
MEDIA_TYPES = {"jpeg": "image/jpeg", "webp": "image/webp", "png": "image/png", "mp4": "video/mp4"}
FFMPEG_TIMEOUT = 300


async def job_record(client, job_id: str) -> dict:
    raw = await client.hgetall(job_key(job_id))
    record = {k.decode(): v.decode() for k, v in raw.items()}
    for key in ("outputs", "seeds"):
        if key in record:
            record[key] = json.loads(record[key])
    return record


async def wait_for_job(client, job_id: str, seconds: float) -> dict:
    """The job's record once it is completed or failed, or as it stands after `seconds`.
    Polls one HGET at a time (20 ms at first, then up to 250 ms): no thread per waiting request."""
    deadline = time.monotonic() + seconds
    delay = 0.02
    while True:
        status = await client.hget(job_key(job_id), "status")
        if (status and status.decode() in TERMINAL) or time.monotonic() >= deadline:
            return await job_record(client, job_id)
        await asyncio.sleep(min(delay, max(deadline - time.monotonic(), 0)))
        delay = min(delay * 1.5, 0.25)


def mp4_frames(mp4: bytes, width: int, height: int) -> list[Image.Image]:
    """Decode an MP4 (size known from its thumbnail) into RGB frames with ffmpeg."""
    command = [ffmpeg_binary(), "-hide_banner", "-loglevel", "error", "-nostdin", "-i", "pipe:0",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-vf", f"crop={width}:{height}:0:0", "pipe:1"]
    result = subprocess.run(command, input=mp4, capture_output=True, timeout=FFMPEG_TIMEOUT)
    if result.returncode != 0:
        raise RuntimeError(f"ffmpeg could not decode the video: {result.stderr.decode(errors='replace')[-300:]}")
    array = np.frombuffer(result.stdout, dtype=np.uint8)
    per_frame = width * height * 3
    if array.size == 0 or array.size % per_frame:
        raise RuntimeError(f"the video decoded to {array.size} bytes, not whole {width}x{height} frames")
    return [Image.fromarray(frame) for frame in array.reshape(-1, height, width, 3)]


def animated_webp(frames: list[Image.Image], fps: int) -> bytes:
    buffer = io.BytesIO()
    frames[0].save(buffer, format="WEBP", save_all=True, append_images=frames[1:], duration=round(1000 / fps),
                   loop=0, quality=85, method=2)
    return buffer.getvalue()


def convert_image(data: bytes, output: str) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        buffer = io.BytesIO()
        if output == "jpeg":
            image.convert("RGB").save(buffer, format="JPEG", quality=92)
        else:
            image.save(buffer, format="PNG")
        return buffer.getvalue()


def render(storage: Storage, record: dict, output: str, fps: int) -> bytes:
    """The completed job's first output as `output`. Blocking (storage, ffmpeg): run it in a thread."""
    bucket, paths = record["bucket"], record["outputs"]
    first = storage.read(bucket, paths[0])
    if paths[0].endswith(".mp4"):
        if output == "mp4":
            return first
        with Image.open(io.BytesIO(storage.read(bucket, paths[1]))) as thumbnail:   # the clip's first frame
            size = thumbnail.size
        frames = mp4_frames(first, *size)
        if output == "webp":
            return animated_webp(frames, fps)
        return convert_image(_png(frames[0]), output)
    return convert_image(first, output)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def cost_headers(job_id: str, record: dict, price_per_gpu_hour: float, gpu_type: str) -> dict[str, str]:
    """The job's GPU time (the worker's wall time on its GPU, start to stored outputs) and its price."""
    seconds = float(record.get("seconds") or 0.0)
    headers = {"X-Execution-Time-Sec": f"{seconds:.3f}", "X-GPU-Type": gpu_type,
               "X-Cost-USD": f"{seconds / 3600 * price_per_gpu_hour:.6f}", "X-Job-Id": job_id}
    if record.get("seeds"):
        headers["X-Seed"] = str(record["seeds"][0])
    return headers
