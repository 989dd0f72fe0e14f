"""The gateway's settings, from the environment (README "RYLA gateway" lists them)."""
from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from workers.config import SAFE_SEGMENT, ConfigError, Settings

TRUE = ("1", "true", "yes", "on")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _number(env: Mapping[str, str], key: str, default: float, minimum: float = 0) -> float:
    value = env.get(key)
    if value in (None, ""):
        return default
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r} is not a number") from None
    if number < minimum:
        raise ConfigError(f"{key}={value!r} must be at least {minimum:g}")
    return number


def detect_gpu_type() -> str:
    """The first GPU's name from nvidia-smi (no CUDA in the gateway process), else "cpu"."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return "cpu"
    try:
        out = subprocess.run([binary, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    names = out.stdout.strip().splitlines()
    return names[0].strip() if out.returncode == 0 and names else "unknown"


@dataclass(frozen=True)
class GatewaySettings:
    enabled: bool                    # GATEWAY_ENABLED: the orchestrator starts the gateway process
    host: str = "127.0.0.1"          # GATEWAY_HOST; anything but loopback needs GATEWAY_TOKEN
    port: int = 8000                 # GATEWAY_PORT
    token: str | None = None         # GATEWAY_TOKEN: `Authorization: Bearer <token>` on every request
    wait_seconds: float = 120.0      # GATEWAY_WAIT_SECONDS: longer jobs answer 303 to their result URL
    max_queue_depth: int = 50        # GATEWAY_MAX_QUEUE_DEPTH: pending jobs past which a request gets 503
    max_body_bytes: int = 32_000_000  # GATEWAY_MAX_BODY_BYTES (also capped by limits.payload_max_bytes)
    price_per_gpu_hour: float = 0.0  # GPU_PRICE_PER_HOUR (USD), for X-Cost-USD
    gpu_type: str | None = None      # GPU_TYPE for X-GPU-Type; unset: nvidia-smi's name, or "cpu"
    user_id: str = "ryla"            # GATEWAY_USER_ID: the storage folder of RYLA's outputs
    loras_dir: Path = Path("loras")  # the workers' LORAS_DIR: character-{lora_id}.safetensors, {lora_name}.safetensors

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, settings: Settings | None = None) -> "GatewaySettings":
        env = os.environ if env is None else env
        settings = settings or Settings.from_env(env)
        host = env.get("GATEWAY_HOST") or "127.0.0.1"
        token = env.get("GATEWAY_TOKEN") or None
        if not is_loopback(host) and not token:
            raise ConfigError(f"GATEWAY_HOST={host} is not loopback: set GATEWAY_TOKEN (clients send it as a bearer token)")
        user_id = env.get("GATEWAY_USER_ID") or "ryla"
        if not SAFE_SEGMENT.match(user_id) or ".." in user_id:
            raise ConfigError(f"GATEWAY_USER_ID={user_id!r} is not a safe storage folder name")
        return cls(
            enabled=(env.get("GATEWAY_ENABLED") or "").lower() in TRUE,
            host=host,
            port=int(_number(env, "GATEWAY_PORT", 8000)),
            token=token,
            wait_seconds=_number(env, "GATEWAY_WAIT_SECONDS", 120.0),
            max_queue_depth=int(_number(env, "GATEWAY_MAX_QUEUE_DEPTH", 50, minimum=1)),
            max_body_bytes=int(_number(env, "GATEWAY_MAX_BODY_BYTES", 32_000_000, minimum=1)),
            price_per_gpu_hour=_number(env, "GPU_PRICE_PER_HOUR", 0.0),
            gpu_type=env.get("GPU_TYPE") or None,
            user_id=user_id,
            loras_dir=settings.lora_folder,      # the workers' LoRA folder
        )
