"""Start-up environment check: the real stack passes; mismatches are explained and refused."""
from __future__ import annotations

import subprocess
import sys

from workers.config import REPO_ROOT, Settings
from workers.env_check import (
    GIB,
    Finding,
    check_environment,
    check_gpu,
    check_pins,
    check_settings,
    check_torch,
    fatal,
    format_findings,
    parse_lock,
    read_lock,
)


def settings(tmp_path, **env) -> Settings:
    (tmp_path / "models").mkdir(exist_ok=True)
    base = {"MODELS_DIR": str(tmp_path / "models"), "DATA_DIR": str(tmp_path / "data")}
    return Settings.from_env({**base, **env})


def test_installed_stack_passes(tmp_path):
    findings = check_environment(settings(tmp_path))
    assert not fatal(findings), format_findings(findings)
    assert any(f.level == "info" and "torch 2.6.0" in f.message and "CUDA 12.4" in f.message for f in findings)


def test_pinned_torch_accepted():
    assert check_torch("2.6.0+cu124", "12.4", False) == []
    assert check_torch("2.6.0", "12.4", False) == []


def test_torch_mismatch_is_an_explained_error():
    for version, cuda in [("2.4.1+cu124", "12.4"), ("2.6.0+cpu", None), ("2.6.0+cu126", "12.6"),
                          ("2.11.0+cu130", "13.0"), ("2.6.0a0", "12.4")]:
        [finding] = check_torch(version, cuda, False)
        assert finding.level == "error"
        assert version in finding.message
    message = check_torch("2.4.1+cu124", "12.4", False)[0].message
    for needed in ("2.4.1/cu124", "diffusers 0.42.1 fails at import", "torch.accelerator", "enable_gqa",
                   "Wan/Qwen-Image/Z-Image", "transformers 5.x", "CUDA 12.4 build",
                   "oldest release that runs every model in scope",
                   "pip install --require-hashes -r requirements.lock", "ALLOW_UNPINNED_STACK=1"):
        assert needed in message, needed
    assert "not installed" in check_torch(None, None, False)[0].message


def test_allow_unpinned_downgrades_to_warning(tmp_path):
    [finding] = check_torch("2.4.1+cu124", "12.4", True)
    assert finding.level == "warning" and "enable_gqa" in finding.message
    [finding] = check_pins({"diffusers": "0.35.0"}, {"diffusers": "0.42.1"}, True, packages=("diffusers",))
    assert finding.level == "warning"
    assert settings(tmp_path, ALLOW_UNPINNED_STACK="1").allow_unpinned_stack


def test_pins_compared_with_lock():
    pins = {"diffusers": "0.42.1", "transformers": "5.23.0"}
    assert check_pins({"diffusers": "0.42.1", "transformers": "5.23.0"}, pins, False) == []
    findings = check_pins({"diffusers": "0.36.0", "transformers": None}, pins, False)
    assert [f.level for f in findings] == ["error", "error"]
    assert "diffusers 0.36.0 is installed" in findings[0].message and "diffusers==0.42.1" in findings[0].message
    assert "transformers is not installed" in findings[1].message
    assert fatal(check_pins({}, None, False))


def test_lock_parsing():
    text = """\
diffusers==0.42.1 \\
    --hash=sha256:abc \\
    --hash=sha256:def
    # via -r requirements.in
Pillow==13.0.0 ; python_version >= "3.9" \\
    --hash=sha256:123
typing_extensions==4.15.0
uvicorn[standard]==0.40.0
# torch==9.9.9 is a comment
--index-url https://example.invalid
"""
    assert parse_lock(text) == {"diffusers": "0.42.1", "pillow": "13.0.0", "typing-extensions": "4.15.0",
                                "uvicorn": "0.40.0"}
    pins = read_lock(REPO_ROOT / "requirements.lock")
    assert pins["torch"] == "2.6.0"
    assert pins["diffusers"] == "0.42.1" and "transformers" in pins


def test_gpu_findings():
    [warning, info] = check_gpu(False, None, None, "2.6.0+cu124", "12.4", require_gpu=False)
    assert warning == Finding("warning", "no CUDA GPU: running on CPU in float32 (slow; for development and tests)")
    assert info.level == "info" and "2.6.0+cu124" in info.message
    assert check_gpu(False, None, None, "2.6.0", "12.4", require_gpu=True)[0].level == "error"
    [warning, info] = check_gpu(True, "NVIDIA L4", 24 * GIB, "2.6.0+cu124", "12.4", False)
    assert warning.level == "warning" and "NVIDIA L4" in warning.message and "24.0 GiB" in warning.message
    [info] = check_gpu(True, "NVIDIA H100 80GB HBM3", 80 * GIB, "2.6.0+cu124", "12.4", False)
    assert info.level == "info"
    for part in ("NVIDIA H100 80GB HBM3", "80.0 GiB", "torch 2.6.0+cu124", "CUDA 12.4"):
        assert part in info.message


def test_device_cuda_without_gpu_is_an_error(tmp_path):
    import torch

    findings = check_environment(settings(tmp_path, DEVICE="cuda"))
    assert fatal(findings) is (not torch.cuda.is_available())


def test_missing_redis_server_is_an_error(tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    s = settings(tmp_path)
    assert s.embedded_redis
    [finding] = check_settings(s, path=str(empty))
    assert finding.level == "error" and "apt-get install redis-server" in finding.message
    monkeypatch.setenv("PATH", str(empty))
    assert fatal(check_environment(s))
    # An external redis needs no local binary.
    assert check_settings(settings(tmp_path, REDIS_URL="redis://example.invalid:6379/0"), path=str(empty)) == []


def test_missing_models_dir_is_a_warning(tmp_path):
    s = Settings.from_env({"MODELS_DIR": str(tmp_path / "nope"), "DATA_DIR": str(tmp_path)})
    [finding] = check_settings(s)
    assert finding.level == "warning" and "MODELS_DIR" in finding.message


def test_format_and_cli(tmp_path):
    text = format_findings([Finding("error", "bad"), Finding("info", "fine")])
    assert text.splitlines() == ["ERROR   bad", "INFO    fine"]
    env = {"PATH": str(tmp_path), "MODELS_DIR": str(tmp_path), "DATA_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "workers.env_check"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "redis-server" in result.stdout


def test_workers_ask_for_expandable_segments_unless_the_operator_chose():
    from workers.worker_process import use_expandable_segments

    env: dict = {}
    use_expandable_segments(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    for key in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        chosen = {key: "max_split_size_mb:512"}
        use_expandable_segments(chosen)
        assert chosen == {key: "max_split_size_mb:512"}


def test_redis_settings_upstash_pair_or_embedded():
    import pytest

    from workers.config import ConfigError

    upstash = Settings.from_env({"UPSTASH_REDIS_REST_URL": "https://eu1-able-cat-1234.upstash.io",
                                 "UPSTASH_REDIS_REST_TOKEN": "tok"})
    assert upstash.redis_url == "rediss://default:tok@eu1-able-cat-1234.upstash.io:6379" and not upstash.embedded_redis
    with pytest.raises(ConfigError, match="UPSTASH_REDIS_REST_URL and UPSTASH_REDIS_REST_TOKEN must be set together"):
        Settings.from_env({"UPSTASH_REDIS_REST_URL": "https://eu1-able-cat-1234.upstash.io"})
    assert Settings.from_env({}).embedded_redis
