"""Per-job LoRA adapters: found and checked before any GPU work, loaded once, active for one job only.

    library = LoraLibrary(folder, url_hosts=("huggingface.co",), max_bytes=..., download_dir=data / "loras")
    resolved = library.resolve(LoraRequest(name="character-anna", url=None, weight=0.8))   # ValueError: why not
    slots = LoraSlots(pipe, "qwen_image")
    slots.check(resolved_list)      # ValueError when a file does not fit this model (wrong family, wrong sizes)
    slots.activate(resolved_list)   # before the job: exactly these adapters at these weights, nothing else
    slots.deactivate()              # after the job

Adapters are diffusers/PEFT adapters named after the file's SHA-256, so the same content loads once
whatever its name or URL; the least recently used are deleted past `max_cached`. `activate` sets
the active set of every job, and a job without LoRAs runs with all adapters disabled: PEFT then
calls only the base layers, so its output is bit-identical to a pipeline that never saw a LoRA.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import requests
import torch

from workers.job import LoraRequest
from workers.media import request_target

log = logging.getLogger(__name__)
SUFFIX = ".safetensors"
_CHUNK = 1 << 20
# Key fragments that tell which model a LoRA was trained for (used in messages only).
_FAMILY_HINTS = (
    ("SDXL", re.compile(r"lora_unet_|(^|\.)unet\.|down_blocks|input_blocks")),
    ("Qwen-Image", re.compile(r"img_mlp|txt_mlp|img_mod|txt_mod")),
    ("Z-Image", re.compile(r"(^|\.)layers\.\d+\.(attention|feed_forward|adaLN)|noise_refiner|context_refiner")),
    ("Flux", re.compile(r"double_blocks|single_blocks|single_transformer_blocks")),
    ("Wan", re.compile(r"(^|\.)blocks\.\d+\.(self_attn|cross_attn|ffn)")),
)
# The suffix that turns a layer's name into one of its adapter's weights (diffusers, PEFT, kohya, DoRA).
_LORA_PART = re.compile(r"\.(lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up|lora_magnitude_vector)"
                        r"(\.[^.]+)?(\.weight)?$|\.alpha$")


@dataclass(frozen=True)
class ResolvedLora:
    label: str          # what the job named: the file name or the URL
    path: Path
    digest: str         # SHA-256 of the file
    weight: float

    @property
    def adapter_name(self) -> str:
        return f"lora_{self.digest[:16]}"


def guess_family(keys) -> str | None:
    text = "\n".join(keys)
    for family, pattern in _FAMILY_HINTS:
        if pattern.search(text):
            return family
    return None


class LoraLibrary:
    """Names and URLs → files on disk. No torch work; safe to call in `check`."""

    def __init__(self, folder: Path, url_hosts: tuple[str, ...] = (), max_bytes: int = 2_000_000_000,
                 download_dir: Path | None = None, timeout: float = 300.0):
        self.folder = Path(folder)
        self.url_hosts = tuple(h.lower() for h in url_hosts)
        self.max_bytes = max_bytes
        self.download_dir = Path(download_dir) if download_dir else self.folder / ".downloads"
        self.timeout = timeout
        self._digests: dict[tuple[str, int, int], str] = {}
        self._downloaded: dict[str, Path] = {}

    def resolve(self, request: LoraRequest) -> ResolvedLora:
        path = self._named(request.name) if request.name else self._download(request.url)
        size = path.stat().st_size
        if size > self.max_bytes:
            raise ValueError(f"LoRA {request.label[:200]!r} is {size} bytes, over the {self.max_bytes}-byte limit")
        return ResolvedLora(label=request.label, path=path, digest=self.digest(path), weight=request.weight)

    def _named(self, name: str) -> Path:
        file_name = name if name.endswith(SUFFIX) else name + SUFFIX
        path = (self.folder / file_name).resolve()
        if path.parent != self.folder.resolve() or not path.is_file():
            raise ValueError(f"unknown LoRA {name!r}: there is no {file_name} in the LoRA folder")
        return path

    def digest(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._digests:
            sha = hashlib.sha256()
            with open(path, "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    sha.update(chunk)
            self._digests[key] = sha.hexdigest()
        return self._digests[key]

    def _allowed(self, url: str) -> None:
        host = request_target(url, "LoRA").host.lower()   # the host requests connects to
        if not self.url_hosts or host not in self.url_hosts:
            allowed = ", ".join(self.url_hosts) or "none: set LORA_URL_HOSTS"
            raise ValueError(f"LoRA URL host {host[:100]!r} is not allowed (allowed: {allowed})")

    def _open(self, url: str) -> requests.Response:
        """GET, following at most 5 redirects, each to an allow-listed host (hubs redirect to their CDN)."""
        for _ in range(6):
            self._allowed(url)
            response = requests.get(url, stream=True, timeout=30, allow_redirects=False)
            if not response.is_redirect:
                return response
            url = urljoin(url, response.headers["Location"])
            response.close()
        raise ValueError("LoRA URL redirects more than 5 times")

    def _download(self, url: str) -> Path:
        self._allowed(url)
        cached = self._downloaded.get(url)
        if cached is not None and cached.is_file():
            return cached
        self.download_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.download_dir / f".part-{os.getpid()}-{hashlib.sha256(url.encode()).hexdigest()[:16]}"
        sha, size, deadline = hashlib.sha256(), 0, time.monotonic() + self.timeout
        try:
            with self._open(url) as response, open(tmp, "wb") as out:
                if response.status_code != 200:
                    raise ValueError(f"LoRA download failed: HTTP {response.status_code} from {url[:200]}")
                for chunk in response.iter_content(_CHUNK):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise ValueError(f"LoRA at {url[:200]} is over the {self.max_bytes}-byte limit")
                    if time.monotonic() > deadline:
                        raise ValueError(f"LoRA download took longer than {self.timeout:g} s")
                    sha.update(chunk)
                    out.write(chunk)
            target = self.download_dir / f"{sha.hexdigest()}{SUFFIX}"   # content-addressed: one copy per content
            os.replace(tmp, target)
        except requests.RequestException as exc:
            raise ValueError(f"LoRA download failed: {type(exc).__name__}") from None
        finally:
            tmp.unlink(missing_ok=True)
        self._downloaded[url] = target
        return target


class LoraSlots:
    """The adapters loaded into one pipeline's denoiser (and text encoders, where the family has LoRA on them)."""

    def __init__(self, pipe, family: str, max_cached: int = 8):
        self.pipe = pipe
        self.family = family
        self.max_cached = max_cached
        self.loaded: OrderedDict[str, ResolvedLora] = OrderedDict()   # adapter name → file, least recent first
        self._verdicts: dict[str, str | None] = {}   # digest → why it does not fit (None: it fits)

    def check(self, loras: list[ResolvedLora]) -> None:
        for lora in loras:
            if lora.digest not in self._verdicts:
                self._verdicts[lora.digest] = self._misfit(lora.path)
            why = self._verdicts[lora.digest]
            if why:
                raise ValueError(f"LoRA {lora.label[:200]!r} does not fit {self.family}: {why}")

    def _misfit(self, path: Path) -> str | None:
        """Why the file's adapters do not match this pipeline's modules (names and sizes), or None."""
        try:
            state = type(self.pipe).lora_state_dict(str(path))
        except Exception as exc:  # noqa: BLE001 — an unreadable or foreign file: say so, do not crash
            return f"it cannot be read as a LoRA ({type(exc).__name__}: {str(exc)[:200]})"
        state = state[0] if isinstance(state, tuple) else state
        keys = [k for k in state if _LORA_PART.search(k)]
        if not keys:
            return "it holds no LoRA weights"
        components = {name: getattr(self.pipe, name, None) for name in self.pipe._lora_loadable_modules}
        matched, first_miss = 0, None
        for key in keys:
            owner = next((c for c in components if key.startswith(c + ".")), None)
            module_path = _LORA_PART.sub("", key[len(owner) + 1:] if owner else key)
            module = dict(components[owner].named_modules()).get(module_path) if owner and components[owner] else None
            if module is None or not _shapes_fit(module, key, state[key]):
                first_miss = first_miss or key
                continue
            matched += 1
        if first_miss is None:
            return None
        guess = guess_family(keys)
        hint = f"it looks like a {guess} LoRA" if guess else f"{len(keys) - matched} of its {len(keys)} weights match no layer"
        return f"{hint} (e.g. {first_miss[:160]})"

    def activate(self, loras: list[ResolvedLora]) -> None:
        """Exactly `loras` active at their weights; with none, every adapter is off."""
        if not loras:
            return self.deactivate()
        weights: dict[str, float] = {}
        for lora in loras:   # the same file twice: one adapter, the weights added
            weights[lora.adapter_name] = weights.get(lora.adapter_name, 0.0) + lora.weight
            if lora.adapter_name not in self.loaded:
                self._load(lora, keep=set(weights))
            self.loaded.move_to_end(lora.adapter_name)
        self.pipe.enable_lora()
        self.pipe.set_adapters(list(weights), list(weights.values()))

    def deactivate(self) -> None:
        if self.loaded:
            self.pipe.disable_lora()

    def _load(self, lora: ResolvedLora, keep: set[str]) -> None:
        while len(self.loaded) >= self.max_cached:
            name = next((n for n in self.loaded if n not in keep), None)
            if name is None:
                break
            self.pipe.delete_adapters(name)
            del self.loaded[name]
        started = time.perf_counter()
        self.pipe.load_lora_weights(str(lora.path), adapter_name=lora.adapter_name)
        self.loaded[lora.adapter_name] = lora
        log.info("LoRA %s loaded as %s in %.2fs", lora.label[:200], lora.adapter_name, time.perf_counter() - started)


def _shapes_fit(module: torch.nn.Module, key: str, tensor: torch.Tensor) -> bool:
    """A down/A matrix reads the layer's inputs, an up/B matrix writes its outputs."""
    layer = getattr(module, "base_layer", module)   # a layer that already carries an adapter
    if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
        return key.endswith(".alpha")   # adapters sit on linear and conv layers only
    fan_in = layer.in_features if isinstance(layer, torch.nn.Linear) else layer.in_channels
    fan_out = layer.out_features if isinstance(layer, torch.nn.Linear) else layer.out_channels
    if re.search(r"lora_A|lora_down|lora\.down", key):
        return tensor.dim() >= 2 and tensor.shape[1] == fan_in
    if re.search(r"lora_B|lora_up|lora\.up", key):
        return tensor.dim() >= 2 and tensor.shape[0] == fan_out
    return True


def resolve_job_loras(job, library: LoraLibrary | None, slots: LoraSlots) -> list[ResolvedLora]:
    """The job type's own adapters, then the payload's: found, and checked against the model's layers."""
    requests = [LoraRequest(name=s.name, url=None, weight=s.weight) for s in job.spec.loras] + list(job.loras)
    if not requests:
        return []
    if library is None:
        raise ValueError(f"{job.job_type} needs LoRAs, and this worker has no LoRA folder configured")
    resolved = [library.resolve(request) for request in requests]
    slots.check(resolved)
    return resolved


class JobLoras:
    """The LoRA half of a family's check() and generate(): resolved and checked in check(), active
    during the pipeline call only."""

    def __init__(self, pipe, family: str, library: LoraLibrary | None = None):
        self.library = library
        self.slots = LoraSlots(pipe, family)
        self._prepared: tuple[str, list[ResolvedLora]] | None = None

    def check(self, job) -> None:
        self._prepared = (job.job_id, resolve_job_loras(job, self.library, self.slots))

    @contextlib.contextmanager
    def active(self, job):
        prepared, self._prepared = self._prepared, None
        resolved = prepared[1] if prepared and prepared[0] == job.job_id else resolve_job_loras(job, self.library, self.slots)
        try:
            self.slots.activate(resolved)
            yield
        finally:
            self.slots.deactivate()   # never active for a later job, whatever happened
