"""The README's path: `dual_orchestrator.py run` on its embedded default (it starts redis-server
itself, local storage), then `submit --wait`, `queues`, `status`, and a clean SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis
from PIL import Image

from tests.conftest import free_port
from tools.small_catalog import write_small_job_types
from tests.worker_harness import REPO


def cli(env, *args, timeout=180):
    return subprocess.run([sys.executable, "dual_orchestrator.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def daemon(tmp_path, tiny_sdxl, tiny_wan):
    port = free_port()
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "EMBEDDED_REDIS_PORT": str(port),
           # 60 steps: long enough (about a second) for `--wait` to see the job generating.
           "JOB_TYPES_FILE": str(write_small_job_types(tmp_path, steps=3, job_types={"sdxl_image_fast": {"steps": 60}})),
           "MODELS_DIR": str(tmp_path / "models"), "SDXL_MODEL_PATH": str(tiny_sdxl.single_file),
           "SDXL_CONFIG_PATH": str(tiny_sdxl.folder), "WAN_MODEL_PATH": str(tiny_wan.t2v), "DEVICE": "cpu",
           "CLAIM_TIMEOUT": "0.5",
           "STOP_GRACE": "10", "WATCH_TIMEOUT": "120"}
    for key in ("REDIS_URL", "UPSTASH_REDIS_REST_URL", "SUPABASE_URL", "SUPABASE_SERVICE_KEY"):
        env.pop(key, None)
    log = open(tmp_path / "orchestrator.log", "wb")
    proc = subprocess.Popen([sys.executable, "dual_orchestrator.py", "run"], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 120
    while True:   # both workers registered and beating = both reported ready
        try:
            alive = [k for k in client.keys("worker:*")]
            if len(alive) == 2 and all(b'"idle"' in client.get(k) for k in alive):
                break
        except redis.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((tmp_path / "orchestrator.log").read_text()[-4000:])
        time.sleep(0.1)
    yield env, proc, client, tmp_path
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def test_run_submit_watch_and_stop(daemon):
    env, proc, client, tmp_path = daemon
    done = cli(env, "submit", "sdxl_image_fast", "a lighthouse at dusk", "--num-images", "2", "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    job_id = lines[0]
    assert any(" processing generating step " in line for line in lines)
    assert any(line.startswith(f"{job_id} completed") for line in lines)
    pngs = [line for line in lines if line.endswith(".png")]
    assert len(pngs) == 2
    for path in pngs:
        assert path.startswith(str(tmp_path / "data" / "storage" / "sdxl_image_fast"))
        assert Image.open(path).size == (64, 64)

    status = json.loads(cli(env, "status", job_id).stdout)
    assert status["status"] == "completed" and len(status["outputs"]) == 2

    video = cli(env, "submit", "video_fast", "waves", "--wait")
    assert video.returncode == 0, video.stdout + video.stderr
    assert " completed done step 3/3" in video.stdout.splitlines()[-3]
    mp4, thumb = video.stdout.splitlines()[-2:]
    assert mp4.endswith(".mp4") and thumb.endswith("_thumb.jpg") and Image.open(thumb).size == (64, 64)
    assert os.path.getsize(mp4) > 0 and mp4.startswith(str(tmp_path / "data" / "storage" / "video_fast"))

    queues = json.loads(cli(env, "queues").stdout)
    by_name = {q.get("queue"): q for q in queues}
    assert by_name["sdxl_queue"]["pending"] == 0 and by_name["sdxl_queue"]["workers"][0]["alive"]
    assert by_name["wan_queue"]["workers"][0]["alive"] and "job_queue" in by_name
    processes = next(q["processes"] for q in queues if "orchestrator" in q)
    assert {name: p["state"] for name, p in processes.items()} == {"image": "running", "video": "running"}

    # A worker that dies is restarted by the orchestrator and serves again.
    key = next(k for k in client.keys("worker:image@*"))
    old_pid = json.loads(client.get(key))["pid"]
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 90
    while json.loads(client.get(key) or "{}").get("pid") in (old_pid, None) or b'"idle"' not in (client.get(key) or b""):
        assert time.monotonic() < deadline, "the image worker was not restarted"
        time.sleep(0.1)
    again = cli(env, "submit", "sdxl_image_fast", "a second lighthouse", "--num-images", "1", "--wait")
    assert again.returncode == 0, again.stdout + again.stderr

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    with pytest.raises(redis.ConnectionError):     # the embedded redis-server went down with it
        client.ping()
    assert (tmp_path / "data" / "redis" / "appendonlydir").exists()


def test_submit_refuses_an_unknown_job_type(tmp_path):
    result = cli({**os.environ, "DATA_DIR": str(tmp_path)}, "submit", "sdxl_image_ultra", "x")
    assert result.returncode == 2 and "unknown job type" in result.stderr


def test_start_sh_demo_stays_local_on_a_configured_pod(tmp_path):
    """README's first command on a pod whose environment names production Redis and Supabase: the
    demo's noise must reach neither. It also names the workers apart when WORKER_ID is set."""
    from tests.supabase_standin import SupabaseStandin

    venv = tmp_path / "venv"                      # the installed stack, as start.sh finds it
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    (venv / ".requirements.lock.sha256").write_text(
        subprocess.run(["sha256sum", "requirements.lock"], cwd=REPO, capture_output=True, text=True).stdout.split()[0])
    port = free_port()
    with SupabaseStandin(service_key="production-key") as production:
        env = {**os.environ, "VENV": str(venv), "PYTHON": str(venv / "bin" / "python"), "DATA_DIR": str(tmp_path / "data"),
               "EMBEDDED_REDIS_PORT": str(port), "HEALTH_PORT": str(free_port()), "DEVICE": "cpu",
               "REDIS_URL": "redis://127.0.0.1:1/0", "SUPABASE_URL": production.url,
               "SUPABASE_SERVICE_KEY": "production-key", "WORKER_ID": "pod-7", "WATCH_TIMEOUT": "120"}
        log = open(tmp_path / "start.log", "wb")
        proc = subprocess.Popen(["bash", "start.sh", "--demo"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            client = redis.Redis(port=port)
            deadline = time.monotonic() + 180
            while True:
                try:
                    if sorted(client.keys("worker:*")) == [b"worker:pod-7-image", b"worker:pod-7-video"] and \
                            all(b'"idle"' in client.get(k) for k in client.keys("worker:*")):
                        break
                except redis.ConnectionError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "start.log").read_text()[-4000:]
                time.sleep(0.2)
            local = {k: v for k, v in env.items() if k not in ("REDIS_URL", "SUPABASE_URL", "SUPABASE_SERVICE_KEY")}
            done = cli(local, "submit", "sdxl_image_fast", "a lighthouse", "--num-images", "1", "--wait")
            assert done.returncode == 0, done.stdout + done.stderr
            png = done.stdout.splitlines()[-1]
            assert png.startswith(str(tmp_path / "data" / "storage")) and Image.open(png).size == (256, 256)
            assert production.requests == []
        finally:
            proc.send_signal(signal.SIGTERM)
            exit_code = proc.wait(60)
            log.close()
    assert exit_code == 0
