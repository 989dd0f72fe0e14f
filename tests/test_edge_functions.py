"""The edge functions: `deno test` on tests/supabase/*.test.ts against a real PostgreSQL and
redis-server, and the dev server over HTTP with the worker's own payload parser and callback sender."""
from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request

from tests.supabase.fixtures import (DENO_CONFIG, REPO, SERVICE_KEY, CALLBACK_SECRET, deno_env, edge_server,  # noqa: F401
                                     postgres_server, require_deno, supabase_db, user_token)
from workers.callback import HttpCallback
from workers.config import load_catalog
from workers.job import parse_job

TEST_FILES = sorted((REPO / "tests" / "supabase").glob("*.test.ts"))


def test_deno_tests_pass(supabase_db, redis_server):
    assert len(TEST_FILES) >= 4
    result = subprocess.run(
        [str(require_deno()), "test", "--allow-all", "--config", str(DENO_CONFIG), *map(str, TEST_FILES)],
        cwd=REPO, env=deno_env({"TEST_DB_URL": supabase_db.url, "TEST_REDIS_URL": redis_server.url}),
        capture_output=True, text=True, timeout=280)
    output = result.stdout + result.stderr
    print(output)
    assert result.returncode == 0, output[-6000:]
    assert " 0 failed" in output and "passed" in output


def request(url: str, body: dict, headers: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_dev_server_round_trip_with_the_worker_parser_and_callback(edge_server, supabase_db, redis_client):
    user = supabase_db.create_user()
    status, answer = request(f"{edge_server.url}/functions/v1/queue-job",
                             {"jobType": "sdxl_image_high", "prompt": "a quiet harbour", "metadata": {"num_images": 2}},
                             {"Authorization": f"Bearer {user_token(user)}"})
    assert status == 200, answer
    raw = redis_client.rpop("sdxl_queue")  # the end the workers take from
    job = parse_job(raw, load_catalog())
    assert (job.job_id, job.user_id, job.job_type, job.num_images, job.bucket) == (
        answer["jobId"], user, "sdxl_image_high", 2, "sdxl_image_high")

    # The worker's own HTTP sender, signed as the live worker sends (bearer + HMAC).
    sink = HttpCallback(edge_server.url, SERVICE_KEY, secret=CALLBACK_SECRET)
    sink.deliver({"jobId": job.job_id, "status": "processing", "workerType": "SDXL"})
    assert supabase_db.query(f"select status, attempts from jobs where id = '{job.job_id}'") == [["processing", "1"]]
    paths = [f"{user}/{job.job_id}_0.png", f"{user}/{job.job_id}_1.png"]
    sink.deliver({"jobId": job.job_id, "status": "completed", "imageUrls": paths, "seeds": [1, 2]})
    sink.deliver({"jobId": job.job_id, "status": "completed", "imageUrls": paths})  # a harmless repeat
    row = supabase_db.query(f"select status, file_path, array_to_string(image_urls, ',') from jobs where id = '{job.job_id}'")
    assert row == [["completed", paths[0], ",".join(paths)]]

    # Bearer-only (no secret) is the other live form; a wrong key is refused.
    bare = HttpCallback(edge_server.url, "wrong-key")
    status, body = request(f"{edge_server.url}/functions/v1/job-callback", {"jobId": job.job_id, "status": "failed"},
                           {"Authorization": "Bearer wrong-key"})
    assert (status, body["error"]) == (401, "invalid credentials")
    assert bare.endpoint.endswith("/functions/v1/job-callback")


def test_dev_server_forwards_storage_to_a_stand_in(supabase_db, redis_server):
    from tests.supabase.fixtures import EdgeServer
    from tests.supabase_standin import SupabaseStandin

    with SupabaseStandin(service_key=SERVICE_KEY) as cloud:
        server = EdgeServer(supabase_db.url, redis_server.url, {"DEV_STORAGE_URL": cloud.url}).start()
        try:  # the upload as CONTRACT.md describes it, sent to the dev server's URL
            upload = urllib.request.Request(f"{server.url}/storage/v1/object/sdxl_image_fast/u1/a.png", data=b"\x89PNG",
                                            method="POST", headers={"Authorization": f"Bearer {SERVICE_KEY}",
                                                                    "Content-Type": "image/png", "x-upsert": "true"})
            with urllib.request.urlopen(upload, timeout=30) as response:
                assert response.status == 200
        finally:
            server.stop()
        assert cloud.objects["sdxl_image_fast/u1/a.png"] == (b"\x89PNG", "image/png")
