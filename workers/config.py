"""job_types.yaml and the environment → typed, validated settings.

Every other module reads configuration through `load_catalog()` and `Settings.from_env()`.
A wrong job_types.yaml raises `ConfigError` naming the key and the problem, which stops start-up.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Mapping
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JOB_TYPES_FILE = REPO_ROOT / "job_types.yaml"
SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
RYLA_ENDPOINT = re.compile(r"^[a-z0-9][a-z0-9.-]{0,63}$")


class ConfigError(Exception):
    """job_types.yaml or the environment is wrong; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Strict):
    prompt_max_chars: int = Field(gt=0)
    negative_prompt_max_chars: int = Field(gt=0)
    max_images_per_job: int = Field(gt=0, le=64)
    input_image_max_bytes: int = Field(gt=0)
    input_image_max_pixels: int = Field(gt=0)
    payload_max_bytes: int = Field(gt=0)
    max_reference_images: int = Field(default=3, ge=1, le=8)  # reference-to-video inputs per job
    max_steps: int = Field(default=50, ge=1, le=200)            # a payload's params.steps, at most
    max_loras_per_job: int = Field(default=4, ge=0, le=16)      # a payload's `loras`, at most
    lora_max_bytes: int = Field(default=2_000_000_000, gt=0)    # one LoRA file (named or downloaded)


class Defaults(_Strict):
    negative_prompt: str = ""


class WorkerSpec(_Strict):
    queue: str
    worker_type: str
    legacy_queues: list[str] = []


class OptimizeSpec(_Strict):
    """GPU speed-ups that keep the numerics (workers/pipelines/accel.py); ignored on the CPU."""
    channels_last: bool = True
    fuse_qkv: bool = True
    compile: Literal["none", "blocks", "unet"] = "blocks"
    # load: compile and every warm-up before the worker reports ready. idle: ready once the weights
    # are loaded (serving the plain pipeline), all of the block the first time the queue is empty (or
    # after ACCELERATE_AFTER_BUSY_SECONDS without): restarts serve sooner.
    compile_at: Literal["load", "idle"] = "idle"
    compile_vae: bool = True     # with compile: the VAE decoder (Wan: its residual blocks) too, static per warmed size
    cuda_graphs: bool = True
    cudnn_benchmark: bool = True
    # batch sizes warmed up (compiled, captured) at load, at each warm-up size; None: 1 and each job
    # type's default_images. Other shapes run the eager UNet (no CUDA graph, no compile in a job).
    warmup_images: list[Annotated[int, Field(ge=1, le=64)]] | None = None
    # sizes ("WIDTHxHEIGHT") warmed up; None: every size of the model's job types
    warmup_sizes: list[Annotated[str, Field(pattern=r"^[1-9][0-9]{1,3}x[1-9][0-9]{1,3}$")]] | None = None


class MagCacheCalibration(_Strict):
    """A checkpoint's MagCache calibration (workers/pipelines/step_cache.py): per denoising step, the
    mean ratio of the blocks' residual norm to the previous step's, one list per CFG branch."""
    num_layers: int = Field(ge=1)            # the transformer it was measured on
    num_attention_heads: int = Field(ge=1)
    source: str
    cond: list[Annotated[float, Field(gt=0, lt=2)]] = Field(min_length=2)
    uncond: list[Annotated[float, Field(gt=0, lt=2)]] = Field(min_length=2)


# Sizes a family renders come in multiples of its VAE's downscale times its transformer's patch:
# SDXL's UNet takes any multiple of 8; Wan, Qwen-Image and Z-Image patch their 8x latents 2x2.
SIZE_MULTIPLES = {"sdxl": 8, "wan": 16, "wan_i2v": 16, "wan_vace": 16, "qwen_image": 16, "qwen_image_edit": 16,
                  "z_image": 16}


class ModelSpec(_Strict):
    # wan: text-to-video and one-frame images; wan_i2v: image-to-video; wan_vace: reference-to-video
    # qwen_image: Qwen-Image (text-to-image, inpaint); qwen_image_edit: Qwen-Image-Edit Plus (edit, inpaint)
    family: Literal["sdxl", "wan", "wan_i2v", "wan_vace", "qwen_image", "qwen_image_edit", "z_image"]
    path: str
    env: str | None = None
    config_path: str | None = None
    config_env: str | None = None
    optimize: OptimizeSpec = OptimizeSpec()
    magcache: list[MagCacheCalibration] = []   # for job types with step_cache; matched to the loaded transformer


class StepCacheSpec(_Strict):
    """A step-caching quality tier (changes the numerics): MagCache's skip rule, see step_cache.py."""
    method: Literal["magcache"] = "magcache"
    threshold: float = Field(gt=0, le=1)       # accumulated error allowed before the blocks run again
    max_skip_steps: int = Field(ge=1, le=10)   # reused steps in a row, at most
    retention: float = Field(ge=0, lt=1)       # share of the first steps that always run


class LoraSpec(_Strict):
    """An adapter a job type always applies (Qwen-Image's Lightning LoRA): a file in LORAS_DIR."""
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    weight: float = Field(default=1.0, ge=-4, le=4)


class JobTypeSpec(_Strict):
    name: str = ""  # filled from the mapping key
    worker: str
    content: Literal["image", "video"]
    mode: Literal["txt2img", "img2img", "txt2video", "img2video", "ref2video", "edit", "inpaint"]
    model: str
    width: int = Field(ge=64, le=4096, multiple_of=8)
    height: int = Field(ge=64, le=4096, multiple_of=8)
    steps: int = Field(ge=1, le=200)
    guidance: float = Field(ge=0, le=30)
    strength: float | None = Field(default=None, gt=0, le=1)
    frames: int | None = Field(default=None, ge=1)
    fps: int | None = Field(default=None, ge=1, le=60)
    default_images: int = Field(ge=1)
    buckets: list[str] = Field(min_length=1)
    quality: str
    expected_seconds: float = Field(gt=0)
    timeout_seconds: float = Field(gt=0)
    max_attempts: int = Field(ge=1, le=20)
    fallback: str | None = None
    phase: int = Field(ge=1)
    loras: list[LoraSpec] = []     # applied to every job of this type, before the payload's own
    step_cache: StepCacheSpec | None = None   # a caching tier: some steps reuse the transformer's residual

    @property
    def content_type(self) -> str:
        return "image/png" if self.content == "image" else "video/mp4"

    @property
    def default_bucket(self) -> str:
        return self.buckets[0]

    @model_validator(mode="after")
    def _check_shape(self) -> "JobTypeSpec":
        for bucket in self.buckets:
            if not SAFE_SEGMENT.match(bucket):
                raise ValueError(f"bucket {bucket!r} is not a safe path segment")
        if self.mode in ("img2img", "inpaint") and self.strength is None:
            raise ValueError(f"{self.mode} needs a strength")
        if self.content == "video" and (self.frames is None or self.fps is None):
            raise ValueError("video job types need frames and fps")
        return self


RYLA_OUTPUTS = {"image": ("jpeg", "png"), "video": ("webp", "mp4")}   # what gateway/results.py renders


class RylaEndpoint(_Strict):
    """One of RYLA's synchronous endpoints (CONTRACT.md, second part), served by the gateway (gateway/).

    It serves once `job_type` is in this catalog; until then it answers 501 naming `needs`."""
    job_type: str | None = None
    output: Literal["jpeg", "webp", "png", "mp4"]
    needs: str | None = None        # what this pod lacks for it (a model family, LoRA loading, ...)
    lora_required: bool = False     # a "-lora" endpoint: a request must name its LoRA (lora_id or lora_name)


class Catalog(_Strict):
    """The parsed job_types.yaml."""

    version: Literal[1]
    limits: Limits
    defaults: Defaults
    workers: dict[str, WorkerSpec]
    models: dict[str, ModelSpec]
    job_types: dict[str, JobTypeSpec]
    ryla: dict[str, RylaEndpoint] = {}   # endpoint name (path without the slash) -> its job type

    @model_validator(mode="after")
    def _check_references(self) -> "Catalog":
        for name, endpoint in self.ryla.items():
            if not RYLA_ENDPOINT.match(name):
                raise ValueError(f"ryla.{name}: an endpoint name is lowercase letters, digits, '.' and '-'")
            # A typo in a served endpoint must not read as "not served yet": only `needs` allows absence.
            if endpoint.job_type not in self.job_types and not endpoint.needs:
                raise ValueError(f"ryla.{name}.job_type: unknown job type {endpoint.job_type!r} "
                                 "(name one of job_types, or say what is missing in `needs`)")
            served = self.job_types.get(endpoint.job_type)
            if served is not None and endpoint.output not in RYLA_OUTPUTS[served.content]:
                raise ValueError(f"ryla.{name}.output: {endpoint.job_type} makes {served.content}s, answered as "
                                 f"{' or '.join(RYLA_OUTPUTS[served.content])}, not {endpoint.output}")
        for name, spec in self.job_types.items():
            where = f"job_types.{name}"
            if not SAFE_SEGMENT.match(name):
                raise ValueError(f"{where}: the name is not a safe identifier")
            if spec.worker not in self.workers:
                raise ValueError(f"{where}.worker: unknown worker {spec.worker!r} (known: {sorted(self.workers)})")
            if spec.model not in self.models:
                raise ValueError(f"{where}.model: unknown model {spec.model!r} (known: {sorted(self.models)})")
            if spec.fallback is not None and spec.fallback not in self.job_types:
                raise ValueError(f"{where}.fallback: unknown job type {spec.fallback!r}")
            if spec.step_cache is not None and (self.models[spec.model].family != "wan"
                                                or not self.models[spec.model].magcache):
                raise ValueError(f"{where}.step_cache: needs a `wan` model with a `magcache` calibration "
                                 f"({spec.model!r} has none)")
            multiple = SIZE_MULTIPLES[self.models[spec.model].family]
            if spec.width % multiple or spec.height % multiple:
                raise ValueError(f"{where}: {spec.width}x{spec.height} is not a multiple of {multiple}, "
                                 f"as {self.models[spec.model].family} models need")
            if spec.default_images > self.limits.max_images_per_job:
                raise ValueError(f"{where}.default_images: {spec.default_images} exceeds limits.max_images_per_job")
        queues = [w.queue for w in self.workers.values()]
        if len(set(queues)) != len(queues):
            raise ValueError("workers: two workers serve the same queue")
        return self

    def job_type(self, name: str) -> JobTypeSpec | None:
        return self.job_types.get(name)

    def size_multiple(self, spec: JobTypeSpec) -> int:
        return SIZE_MULTIPLES[self.models[spec.model].family]

    def queue_of(self, job_type: str) -> str:
        return self.workers[self.job_types[job_type].worker].queue

    def types_for_worker(self, worker: str) -> list[JobTypeSpec]:
        return [s for s in self.job_types.values() if s.worker == worker]


def load_catalog(path: str | os.PathLike | None = None) -> Catalog:
    """Read and validate job_types.yaml. Raises ConfigError naming the key and the problem."""
    path = Path(path or os.environ.get("JOB_TYPES_FILE") or DEFAULT_JOB_TYPES_FILE)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for name, spec in (raw.get("job_types") or {}).items():
        if isinstance(spec, dict):
            spec.setdefault("name", name)
    try:
        return Catalog.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from exc


def _env_float(env: Mapping[str, str], key: str, default: float) -> float:
    value = env.get(key)
    if value in (None, ""):
        return default
    try:
        return float(value)
    except ValueError as exc:
        raise ConfigError(f"{key}={value!r} is not a number") from exc


def _switch(env: Mapping[str, str], key: str) -> bool:
    """An on-by-default switch: 0, false, no or off turn it off."""
    return env.get(key, "1").lower() not in ("0", "false", "no", "off")


def _positive_or_none(env: Mapping[str, str], key: str) -> float | None:
    value = _env_float(env, key, 0.0)
    if value < 0:
        raise ConfigError(f"{key}={value:g} must be positive (or unset)")
    return value or None


def upstash_redis_url(rest_url: str, token: str) -> str:
    """Upstash serves the Redis protocol over TLS on the REST URL's host; the token is the password."""
    host = urlparse(rest_url).hostname
    if not host:
        raise ConfigError(f"UPSTASH_REDIS_REST_URL={rest_url!r} has no host")
    return f"rediss://default:{token}@{host}:6379"


@dataclass(frozen=True)
class Settings:
    """Everything read from the environment, in one place (README lists each variable)."""

    redis_url: str
    embedded_redis: bool            # True: the orchestrator starts a local redis-server
    embedded_redis_port: int
    supabase_url: str | None
    supabase_service_key: str | None
    callback_secret: str | None
    models_dir: Path
    data_dir: Path
    device: str                     # "auto", "cpu" or "cuda"
    heartbeat_ttl: float
    claim_timeout: float
    maintenance_interval: float
    http_timeout: float
    allow_unpinned_stack: bool
    job_types_file: Path
    model_overrides: dict[str, str] = field(default_factory=dict)
    optimize: bool = True           # OPTIMIZE=0: no compile, CUDA graphs or layout changes on the GPU
    video_vram_budget_gib: float | None = None  # GPU memory the video worker may use; None: no cap
    health_host: str = "127.0.0.1"  # the orchestrator's /health and /metrics (workers/metrics.py)
    health_port: int = 9464         # 0: no endpoint
    image_vram_budget_gib: float | None = None  # weights the image worker keeps on the GPU; None: all of them
    loras_dir: Path | None = None   # LoRA files named by jobs; None: MODELS_DIR/loras
    lora_url_hosts: tuple[str, ...] = ()  # hosts a job's LoRA URL may name; empty: no URLs
    fallback_routing: bool = True   # FALLBACK_ROUTING=0: sdxl jobs fail instead of running as their fallback
    overlap_finish: bool = True     # OVERLAP_FINISH=0: encode/upload/callback before the next job starts
    preload_workers: bool = True    # PRELOAD_WORKERS=0: workers start as plain subprocesses (workers/preload.py)

    @property
    def local_mode(self) -> bool:
        """No Supabase: outputs go to data_dir/storage and statuses to data_dir/jobs."""
        return not (self.supabase_url and self.supabase_service_key)

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "storage"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        port = int(env.get("EMBEDDED_REDIS_PORT") or 6390)
        redis_url = env.get("REDIS_URL") or ""
        embedded = False
        if not redis_url and bool(env.get("UPSTASH_REDIS_REST_URL")) != bool(env.get("UPSTASH_REDIS_REST_TOKEN")):
            raise ConfigError("UPSTASH_REDIS_REST_URL and UPSTASH_REDIS_REST_TOKEN must be set together")
        if not redis_url and env.get("UPSTASH_REDIS_REST_URL"):
            redis_url = upstash_redis_url(env["UPSTASH_REDIS_REST_URL"], env["UPSTASH_REDIS_REST_TOKEN"])
        if not redis_url:
            redis_url, embedded = f"redis://127.0.0.1:{port}/0", True
        supabase_url = (env.get("SUPABASE_URL") or "").rstrip("/") or None
        service_key = env.get("SUPABASE_SERVICE_KEY") or env.get("SUPABASE_SERVICE_ROLE_KEY") or None
        if bool(supabase_url) != bool(service_key):
            raise ConfigError("SUPABASE_URL and SUPABASE_SERVICE_KEY must be set together (or neither, for local mode)")
        device = env.get("DEVICE", "auto")
        if device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"DEVICE={device!r}: use auto, cpu or cuda")
        overrides = {k: v for k, v in env.items() if k.endswith("_MODEL_PATH") or k.endswith("_CONFIG_PATH")}
        return cls(
            redis_url=redis_url,
            embedded_redis=embedded,
            embedded_redis_port=port,
            supabase_url=supabase_url,
            supabase_service_key=service_key,
            callback_secret=env.get("CALLBACK_SECRET") or None,
            models_dir=Path(env.get("MODELS_DIR") or "/workspace/models"),
            data_dir=Path(env.get("DATA_DIR") or REPO_ROOT / "data").resolve(),
            device=device,
            heartbeat_ttl=_env_float(env, "HEARTBEAT_TTL", 30.0),
            claim_timeout=_env_float(env, "CLAIM_TIMEOUT", 5.0),
            maintenance_interval=_env_float(env, "MAINTENANCE_INTERVAL", 5.0),
            http_timeout=_env_float(env, "HTTP_TIMEOUT", 30.0),
            allow_unpinned_stack=env.get("ALLOW_UNPINNED_STACK", "") in ("1", "true", "yes"),
            job_types_file=Path(env.get("JOB_TYPES_FILE") or DEFAULT_JOB_TYPES_FILE),
            model_overrides=overrides,
            optimize=_switch(env, "OPTIMIZE"),
            fallback_routing=_switch(env, "FALLBACK_ROUTING"),
            overlap_finish=_switch(env, "OVERLAP_FINISH"),
            preload_workers=_switch(env, "PRELOAD_WORKERS"),
            video_vram_budget_gib=_positive_or_none(env, "VIDEO_VRAM_BUDGET_GIB"),
            health_host=env.get("HEALTH_HOST") or "127.0.0.1",
            health_port=int(_env_float(env, "HEALTH_PORT", 9464)),
            image_vram_budget_gib=_positive_or_none(env, "IMAGE_VRAM_BUDGET_GIB"),
            loras_dir=Path(env["LORAS_DIR"]) if env.get("LORAS_DIR") else None,
            lora_url_hosts=tuple(h.strip().lower() for h in (env.get("LORA_URL_HOSTS") or "").split(",") if h.strip()),
        )

    @property
    def lora_folder(self) -> Path:
        return self.loras_dir or self.models_dir / "loras"

    def _resolve(self, relative: str, env_key: str | None) -> Path:
        value = self.model_overrides.get(env_key, "") if env_key else ""
        path = Path(value or relative)
        return path if path.is_absolute() else self.models_dir / path

    def model_path(self, model: ModelSpec) -> Path:
        return self._resolve(model.path, model.env)

    def model_config_path(self, model: ModelSpec) -> Path | None:
        if model.config_path is None and not (model.config_env and self.model_overrides.get(model.config_env)):
            return None
        return self._resolve(model.config_path or "", model.config_env)
