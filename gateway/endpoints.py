"""A RYLA request body (CONTRACT.md, second part) → the inputs of a normal job payload.

Checks here answer before anything is queued: 400 for a bad or missing field, 404 for an unknown
LoRA, 413 for an oversize image, 501 for what this pod cannot do. Everything the worker checks at
parse time is checked again by the caller with `parse_job`, the worker's own parser.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workers.config import SAFE_SEGMENT, Catalog, JobTypeSpec
from workers.job import LORA_FAMILIES
from workers.media import INPUT_FORMATS

# Wan's VAE: clips of 4k+1 frames (workers/pipelines/wan.py checks the same in the worker; checked
# here too so that RYLA gets a 400, not a failed job).
WAN_FRAME_MULTIPLE = 4
ASPECT_RATIOS = {"1:1": (1, 1), "16:9": (16, 9), "9:16": (9, 16), "4:3": (4, 3), "3:4": (3, 4),
                 "3:2": (3, 2), "2:3": (2, 3), "21:9": (21, 9), "9:21": (9, 21)}


class GatewayError(Exception):
    """Answered as `{"detail": detail}` with `status` (FastAPI's error shape, what RYLA's client reads)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


class RylaRequest(BaseModel):
    """The fields RYLA's endpoints take; unknown ones are ignored, as RYLA's own servers do."""

    model_config = ConfigDict(extra="ignore")
    prompt: str | None = None
    negative_prompt: str | None = None
    width: int | None = Field(default=None, ge=64, le=4096)
    height: int | None = Field(default=None, ge=64, le=4096)
    aspect_ratio: str | None = None
    steps: int | None = Field(default=None, ge=1)
    cfg: float | None = Field(default=None, ge=0, le=30)
    guidance_scale: float | None = Field(default=None, ge=0, le=30)
    seed: int | None = Field(default=None, ge=0)
    length: int | None = Field(default=None, ge=1)
    num_frames: int | None = Field(default=None, ge=1)
    fps: int | None = Field(default=None, ge=1, le=60)
    reference_image: str | None = None
    source_image: str | None = None
    image: str | None = None
    init_image: str | None = None
    reference_images: list[str] | None = None
    mask: str | None = None
    mask_image: str | None = None
    strength: float | None = Field(default=None, gt=0, le=1)
    lora_id: str | None = None
    lora_name: str | None = None
    lora_strength: float | None = None
    trigger_word: str | None = None


def parse_request(body: Any) -> RylaRequest:
    if not isinstance(body, dict):
        raise GatewayError(400, "the request body must be a JSON object")
    try:
        return RylaRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise GatewayError(400, f"{where}: {first['msg']}") from None


def image_source(value: str, what: str, max_bytes: int, max_pixels: int) -> str:
    """A `data:` URI, bare base64 or an http(s) URL → what the worker accepts (data: URI or URL).
    The size and the header's pixel count are checked here (413); the worker decodes the pixels."""
    if value.startswith(("https://", "http://")):
        return value
    body = value.partition(",")[2] if value.startswith("data:") else value
    if value.startswith("data:") and not value.partition(",")[0].endswith(";base64"):
        raise GatewayError(400, f"{what}: a data: URI must be data:image/<type>;base64,<data>")
    body = "".join(body.split())
    if len(body) * 3 // 4 > max_bytes + 2:
        raise GatewayError(413, f"{what} is larger than the {max_bytes}-byte limit")
    try:
        data = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise GatewayError(400, f"{what} is not valid base64 (send a data:image/...;base64 URI)") from None
    try:
        with Image.open(io.BytesIO(data), formats=INPUT_FORMATS) as image:   # reads the header only
            width, height, kind = image.width, image.height, image.format
    except Image.DecompressionBombError:
        raise GatewayError(413, f"{what} is over the {max_pixels}-pixel limit") from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise GatewayError(400, f"{what} is not a decodable image ({', '.join(INPUT_FORMATS)})") from None
    if width * height > max_pixels:
        raise GatewayError(413, f"{what} is {width}x{height}, over the {max_pixels}-pixel limit")
    return f"data:image/{kind.lower()};base64," + base64.b64encode(data).decode()


def lora_file(request: RylaRequest, loras_dir: Path) -> Path | None:
    """The LoRA a request names (`lora_id` → character-{id}.safetensors, or `lora_name`), if any."""
    name = request.lora_id and f"character-{request.lora_id}" or request.lora_name
    if not name:
        return None
    name = name if name.endswith(".safetensors") else f"{name}.safetensors"
    if not SAFE_SEGMENT.match(name) or ".." in name:
        raise GatewayError(400, f"LoRA name {name[:80]!r} is not a plain file name")
    path = loras_dir / name
    if not path.is_file():
        raise GatewayError(404, f"LoRA {name} not found")
    return path


def sized(spec: JobTypeSpec, request: RylaRequest, multiple: int) -> tuple[int | None, int | None]:
    """The requested size; an aspect ratio alone gives the job type's pixel count in that shape."""
    if request.aspect_ratio is None or request.width or request.height:
        return request.width, request.height
    ratio = ASPECT_RATIOS.get(request.aspect_ratio)
    if ratio is None:
        raise GatewayError(400, f"aspect_ratio {request.aspect_ratio!r} is not one of {', '.join(ASPECT_RATIOS)}")
    scale = math.sqrt(spec.width * spec.height / (ratio[0] * ratio[1]))
    return (int(ratio[0] * scale) // multiple * multiple, int(ratio[1] * scale) // multiple * multiple)


def job_inputs(catalog: Catalog, spec: JobTypeSpec, request: RylaRequest, loras_dir: Path) -> dict[str, Any]:
    """Payload inputs (workers/submit.new_payload's **inputs) for one request to `spec`'s endpoint."""
    if request.prompt is None or not request.prompt.strip():
        raise GatewayError(400, "prompt is required")
    family = catalog.models[spec.model].family
    lora = lora_file(request, loras_dir)
    if lora is not None and family not in LORA_FAMILIES:
        raise GatewayError(501, f"LoRA loading is not served for {spec.name} ({family} models) by this pod")
    wan = family.startswith("wan")
    multiple = catalog.size_multiple(spec)
    width, height = sized(spec, request, multiple)
    for what, value in (("width", width), ("height", height)):
        if value is not None and value % multiple:
            raise GatewayError(400, f"{what} {value} must be a multiple of {multiple} for {spec.name}")
    guidance = request.cfg if request.cfg is not None else request.guidance_scale
    params = {"width": width, "height": height, "steps": request.steps, "guidance": guidance}
    inputs: dict[str, Any] = {"seed": request.seed, "negativePrompt": request.negative_prompt,
                              "params": {k: v for k, v in params.items() if v is not None} or None}
    if lora is not None:    # the worker loads LORAS_DIR/{name}.safetensors for this job only
        inputs["loras"] = [{"name": lora.stem, "weight": 1.0 if request.lora_strength is None else request.lora_strength}]
    if spec.content == "video":
        frames = request.length or request.num_frames
        if frames is not None and wan and (frames - 1) % WAN_FRAME_MULTIPLE:
            raise GatewayError(400, f"length {frames} must be {WAN_FRAME_MULTIPLE}k+1 frames (e.g. 33, 49, 81)")
        inputs["numFrames"] = frames
    limits = catalog.limits
    source = request.reference_image or request.source_image or request.image or request.init_image
    def checked(value: str, what: str) -> str:
        return image_source(value, what, limits.input_image_max_bytes, limits.input_image_max_pixels)

    if spec.mode in ("img2img", "inpaint", "img2video"):
        if not source:
            raise GatewayError(400, f"{'reference_image' if spec.mode == 'img2video' else 'image'} is required")
        uri = checked(source, "the input image")
        inputs["referenceImage" if spec.mode == "img2video" else "initImage"] = uri
        if spec.mode != "img2video":
            inputs["strength"] = request.strength
    if spec.mode == "inpaint":
        mask = request.mask or request.mask_image
        if not mask:
            raise GatewayError(400, "mask is required (white where to paint)")
        inputs["maskImage"] = checked(mask, "the mask")
    elif spec.mode in ("ref2video", "edit"):    # edit: the picture(s) to edit, one or several
        sources = request.reference_images or ([source] if source else [])
        if not sources:
            raise GatewayError(400, "reference_images is required" if spec.mode == "ref2video" else "image is required")
        inputs["referenceImages"] = [checked(value, f"reference image {i}") for i, value in enumerate(sources, 1)]
    return inputs
