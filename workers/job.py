"""Queue payload → one typed, validated `Job`.

`parse_job` never lets bad input through: it raises `JobRejected` with a message the frontend can
show. `JobRejected.job_id` is set whenever the payload carried a usable jobId, so the runner can
send a failed callback; without one, the raw payload goes to the dead-letter list.
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from workers.config import SAFE_SEGMENT, Catalog, JobTypeSpec
from workers.safety import check_prompt

MAX_SEED = 2**32 - 1
LORA_FAMILIES = ("qwen_image", "qwen_image_edit", "z_image")   # model families whose jobs take `loras`


@dataclass(frozen=True)
class LoraRequest:
    """One adapter a job asks for: a file in the LoRA folder (`name`) or an allow-listed URL."""
    name: str | None
    url: str | None
    weight: float

    @property
    def label(self) -> str:
        return self.name or self.url or ""


class JobRejected(Exception):
    """The payload cannot run. `reason` is shown to the user; `job_id` is None when unknown."""

    def __init__(self, reason: str, job_id: str | None = None, user_id: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.job_id = job_id
        self.user_id = user_id


@dataclass(frozen=True)
class Job:
    job_id: str
    job_type: str
    user_id: str
    spec: JobTypeSpec
    prompt: str
    negative_prompt: str
    num_images: int
    bucket: str
    seeds: tuple[int, ...]          # one per output image
    width: int
    height: int
    steps: int
    guidance: float
    strength: float | None
    init_image: str | None          # img2img source: https URL or data: URI (decoded by the pipeline)
    payload: dict[str, Any]         # the original payload, for the callback and debugging
    frames: int | None = None       # frames per output (1 for Wan images); None for SDXL
    fps: int | None = None          # video job types
    reference_images: tuple[str, ...] = ()  # image-to-video (one), reference-to-video and edit (1..limit) sources
    mask_image: str | None = None   # inpaint: white where the image is repainted; the init image's size
    loras: tuple[LoraRequest, ...] = ()   # the payload's adapters (the job type's own come from spec.loras)
    size_given: bool = False        # params set width or height: an input picture's shape does not change it

    @property
    def queue_worker(self) -> str:
        return self.spec.worker


def _pick(payload: dict, meta: dict, *names: str) -> Any:
    """First non-None value among `names`, top level first, then `metadata`."""
    for source in (payload, meta):
        for name in names:
            if source.get(name) is not None:
                return source[name]
    return None


def _safe_segment(value: Any, what: str, job_id: str | None) -> str:
    if not isinstance(value, str) or not SAFE_SEGMENT.match(value) or ".." in value:
        raise JobRejected(f"{what} {str(value)[:80]!r} is not a safe storage path segment", job_id)
    return value


def _as_int(value: Any, what: str, lo: int, hi: int, job_id: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise JobRejected(f"{what} must be an integer, got {type(value).__name__}", job_id)
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        raise JobRejected(f"{what} must be an integer, got {str(value)[:40]!r}", job_id) from None
    if isinstance(value, float) and value != number:
        raise JobRejected(f"{what} must be an integer, got {value}", job_id)
    if not lo <= number <= hi:
        raise JobRejected(f"{what} must be between {lo} and {hi}, got {number}", job_id)
    return number


def decode_payload(raw: bytes | str, max_bytes: int) -> dict:
    """Bytes from Redis → dict, or JobRejected without a job id."""
    if len(raw) > max_bytes:
        raise JobRejected(f"payload is {len(raw)} bytes, over the {max_bytes}-byte limit")
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError) as exc:   # also: nesting too deep, integers over 4,300 digits
        raise JobRejected(f"payload is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(payload, dict):
        raise JobRejected(f"payload must be a JSON object, got {type(payload).__name__}")
    return payload


def parse_job(raw: bytes | str | dict, catalog: Catalog) -> Job:
    payload = raw if isinstance(raw, dict) else decode_payload(raw, catalog.limits.payload_max_bytes)
    limits = catalog.limits

    job_id = payload.get("jobId")
    if not isinstance(job_id, str) or not job_id:
        raise JobRejected("payload has no jobId")
    job_id = _safe_segment(job_id, "jobId", None)  # also names output files
    user_id = payload.get("userId")
    if user_id in (None, ""):
        raise JobRejected("payload has no userId", job_id)
    user_id = _safe_segment(user_id, "userId", job_id)

    job_type = payload.get("jobType")
    if not isinstance(job_type, str) or not job_type:
        raise JobRejected("payload has no jobType", job_id, user_id)
    spec = catalog.job_type(job_type)
    if spec is None:
        known = ", ".join(sorted(catalog.job_types))
        raise JobRejected(f"unknown jobType {job_type[:60]!r} (known: {known})", job_id, user_id)

    meta = payload.get("metadata")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise JobRejected("metadata must be a JSON object", job_id, user_id)

    prompt = payload.get("prompt", "")
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise JobRejected("prompt must be a string", job_id, user_id)
    if len(prompt) > limits.prompt_max_chars:
        raise JobRejected(f"prompt is {len(prompt)} characters, over the {limits.prompt_max_chars}-character limit", job_id, user_id)
    refusal = check_prompt(prompt)     # queue-job checks too; a queue item may come from elsewhere
    if refusal is not None:
        raise JobRejected(refusal, job_id, user_id)

    negative = _pick(payload, meta, "negativePrompt", "negative_prompt")
    if negative is None:
        negative = catalog.defaults.negative_prompt
    if not isinstance(negative, str) or len(negative) > limits.negative_prompt_max_chars:
        raise JobRejected(f"negative prompt must be a string of at most {limits.negative_prompt_max_chars} characters", job_id, user_id)

    count = meta.get("num_images")
    if count is None:
        count = payload.get("numImages")
    num_images = spec.default_images if count is None else _as_int(count, "number of images", 1, limits.max_images_per_job, job_id)
    if spec.content == "video":
        num_images = 1

    bucket = payload.get("bucket") or meta.get("bucket")
    if bucket in (None, ""):
        bucket = spec.default_bucket
    bucket = _safe_segment(bucket, "bucket", job_id)
    if bucket not in spec.buckets:
        raise JobRejected(f"bucket {bucket!r} is not allowed for {job_type} (allowed: {', '.join(spec.buckets)})", job_id, user_id)

    seed = _pick(payload, meta, "seed")
    first_seed = secrets.randbelow(MAX_SEED - limits.max_images_per_job) if seed is None else _as_int(seed, "seed", 0, MAX_SEED - num_images, job_id)

    strength = None
    init_image = None
    mask_image = None
    if spec.mode in ("img2img", "inpaint"):
        init_image = _pick(payload, meta, "initImage", "init_image", "imageUrl", "init_image_url", "image")
        if not isinstance(init_image, str) or not init_image:
            raise JobRejected(f"{job_type} needs an init image (initImage: an https URL or a data: URI)", job_id, user_id)
        if not (init_image.startswith("data:image/") or init_image.startswith("https://") or init_image.startswith("http://")):
            raise JobRejected("initImage must be an http(s) URL or a data:image/... URI", job_id, user_id)
        raw_strength = _pick(payload, meta, "strength")
        strength = spec.strength if raw_strength is None else raw_strength
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise JobRejected(f"strength must be a number in (0, 1], got {str(raw_strength)[:40]!r}", job_id, user_id)
        strength = float(strength)
    if spec.mode == "inpaint":
        mask_image = _pick(payload, meta, "maskImage", "mask_image", "mask")
        if mask_image is None:
            raise JobRejected(f"{job_type} needs a mask (maskImage: an https URL or a data: URI, white where to paint)",
                              job_id, user_id)
        mask_image = _image_source(mask_image, "maskImage", job_id, user_id)
    loras = _loras(_pick(payload, meta, "loras"), limits.max_loras_per_job, job_id, user_id)
    if loras and catalog.models[spec.model].family not in LORA_FAMILIES:
        raise JobRejected(f"{job_type} takes no LoRAs (they work with {', '.join(LORA_FAMILIES)} models)", job_id, user_id)

    frames = spec.frames
    if spec.content == "video":
        requested = _pick(payload, meta, "numFrames", "num_frames")
        if requested is not None:   # shorter clips only: the job type's length bounds time and timeout
            frames = _as_int(requested, "number of frames", 1, spec.frames, job_id)
    references = _reference_images(spec, payload, meta, limits.max_reference_images, job_id, user_id)
    params = _pick(payload, meta, "params")
    width, height, steps, guidance = _params(spec, params, limits.max_steps, catalog.size_multiple(spec), job_id, user_id)
    size_given = isinstance(params, dict) and (params.get("width") is not None or params.get("height") is not None)

    return Job(
        job_id=job_id,
        job_type=job_type,
        user_id=user_id,
        spec=spec,
        prompt=prompt,
        negative_prompt=negative,
        num_images=num_images,
        bucket=bucket,
        seeds=tuple(first_seed + i for i in range(num_images)),
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        strength=strength,
        init_image=init_image,
        payload=payload,
        frames=frames,
        fps=spec.fps,
        reference_images=references,
        mask_image=mask_image,
        loras=loras,
        size_given=size_given,
    )


def _loras(value: Any, limit: int, job_id: str, user_id: str) -> tuple[LoraRequest, ...]:
    """`loras`: a list of {name, weight} (a file in the LoRA folder) or {url, weight} (an https URL on an
    allow-listed host, checked by the worker). Weight defaults to 1.0."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > limit:
        raise JobRejected(f"loras must be a list of at most {limit} entries", job_id, user_id)
    out = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or (entry.get("name") is None) == (entry.get("url") is None):
            raise JobRejected(f"loras[{i}] must be an object with a name or a url (and a weight)", job_id, user_id)
        name, url, weight = entry.get("name"), entry.get("url"), entry.get("weight", 1.0)
        if name is not None and (not isinstance(name, str) or not SAFE_SEGMENT.match(name) or ".." in name):
            raise JobRejected(f"loras[{i}].name {str(name)[:80]!r} is not a LoRA file name", job_id, user_id)
        if url is not None and (not isinstance(url, str) or not url.startswith("https://") or len(url) > 2000):
            raise JobRejected(f"loras[{i}].url must be an https URL", job_id, user_id)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not -4 <= weight <= 4:
            raise JobRejected(f"loras[{i}].weight must be a number between -4 and 4, got {str(weight)[:40]!r}",
                              job_id, user_id)
        out.append(LoraRequest(name=name, url=url, weight=float(weight)))
    return tuple(out)


def _params(spec: JobTypeSpec, params: Any, max_steps: int, multiple: int, job_id: str,
            user_id: str) -> tuple[int, int, int, float]:
    """`params`: width, height, steps, guidance within the job type's bounds (the type's pixel count
    bounds memory and time); anything left out keeps the type's value."""
    if params is None:
        return spec.width, spec.height, spec.steps, spec.guidance
    if not isinstance(params, dict):
        raise JobRejected("params must be a JSON object", job_id, user_id)
    width = spec.width if params.get("width") is None else _as_int(params["width"], "width", 64, 4096, job_id)
    height = spec.height if params.get("height") is None else _as_int(params["height"], "height", 64, 4096, job_id)
    if width % multiple or height % multiple:
        raise JobRejected(f"width and height must be multiples of {multiple} for {spec.name}, got {width}x{height}",
                          job_id, user_id)
    if width * height > spec.width * spec.height:
        raise JobRejected(f"{width}x{height} is larger than {spec.name}'s {spec.width}x{spec.height} pixels", job_id, user_id)
    steps = spec.steps if params.get("steps") is None else _as_int(params["steps"], "steps", 1, max_steps, job_id)
    guidance = params.get("guidance")
    if guidance is None:
        guidance = spec.guidance
    elif isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance <= 30:
        raise JobRejected(f"guidance must be a number between 0 and 30, got {str(guidance)[:40]!r}", job_id, user_id)
    return width, height, steps, float(guidance)


def _image_source(value: Any, what: str, job_id: str, user_id: str) -> str:
    if not isinstance(value, str) or not value:
        raise JobRejected(f"{what} must be an https URL or a data:image/... URI", job_id, user_id)
    if not (value.startswith("data:image/") or value.startswith(("https://", "http://"))):
        raise JobRejected(f"{what} must be an http(s) URL or a data:image/... URI", job_id, user_id)
    return value


def _reference_images(spec: JobTypeSpec, payload: dict, meta: dict, limit: int, job_id: str,
                      user_id: str) -> tuple[str, ...]:
    """img2video: one referenceImage (initImage and imageUrl as well); ref2video and edit: referenceImages,
    1..limit (edit also takes a single initImage / image as a list of one)."""
    if spec.mode == "img2video":
        value = _pick(payload, meta, "referenceImage", "reference_image", "initImage", "init_image", "imageUrl", "image")
        if value is None:
            raise JobRejected(f"{spec.name} needs a reference image (referenceImage: an https URL or a data: URI)",
                              job_id, user_id)
        return (_image_source(value, "referenceImage", job_id, user_id),)
    if spec.mode not in ("ref2video", "edit"):
        return ()
    values = _pick(payload, meta, "referenceImages", "reference_images")
    if values is None:
        singles = ("referenceImage", "reference_image") + (
            ("initImage", "init_image", "imageUrl", "image") if spec.mode == "edit" else ())
        single = _pick(payload, meta, *singles)
        values = None if single is None else [single]
    if not isinstance(values, list) or not 1 <= len(values) <= limit:
        got = f"{len(values)}" if isinstance(values, list) else "none" if values is None else type(values).__name__
        raise JobRejected(f"{spec.name} needs 1 to {limit} reference images (referenceImages: a list of https URLs "
                          f"or data: URIs), got {got}", job_id, user_id)
    return tuple(_image_source(v, f"referenceImages[{i}]", job_id, user_id) for i, v in enumerate(values))


def job_id_of(raw: bytes | str) -> str | None:
    """Best-effort jobId of a raw payload (for bookkeeping before parsing succeeds)."""
    try:
        value = json.loads(raw).get("jobId")
    except (ValueError, AttributeError, RecursionError):   # ValueError covers bad UTF-8 and huge integers
        return None
    return value if isinstance(value, str) and SAFE_SEGMENT.match(value) else None
