"""Both halves at once: queue-job (Deno, real PostgreSQL + Redis) pushes, the real image worker
process (tiny SDXL) consumes and uploads, job-callback (Deno) updates the row to completed."""
from __future__ import annotations

import time

from tests.supabase.fixtures import CALLBACK_SECRET, SERVICE_KEY, EdgeServer, postgres_server, supabase_db, user_token  # noqa: F401
from tests.supabase_standin import SupabaseStandin
from tests.test_edge_functions import request
from tests.worker_harness import WorkerProcess, worker_env
from tools.small_catalog import write_small_job_types


def wait_for_row(db, job_id: str, timeout: float = 120) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = db.query(f"select status, file_path, array_to_string(image_urls, ','), error_message "
                       f"from jobs where id = '{job_id}'")[0]
        if row[0] in ("completed", "failed"):
            return row
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} stayed {row[0]}")


def test_queue_job_to_worker_to_job_callback(tmp_path, supabase_db, redis_server, redis_client, tiny_sdxl):
    with SupabaseStandin(service_key=SERVICE_KEY) as cloud:
        edge = EdgeServer(supabase_db.url, redis_server.url, {"DEV_STORAGE_URL": cloud.url}).start()
        env = worker_env(redis_server.url, tmp_path / "data", write_small_job_types(tmp_path), tiny_sdxl.single_file,
                         tiny_sdxl.folder, SUPABASE_URL=edge.url, SUPABASE_SERVICE_KEY=SERVICE_KEY,
                         CALLBACK_SECRET=CALLBACK_SECRET)
        worker = WorkerProcess("image", env, tmp_path / "image.log").start()
        try:
            user = supabase_db.create_user()
            status, answer = request(f"{edge.url}/functions/v1/queue-job",
                                     {"jobType": "sdxl_image_fast", "prompt": "a lighthouse at dusk",
                                      "metadata": {"num_images": 2}},
                                     {"Authorization": f"Bearer {user_token(user)}"})
            assert status == 200, answer
            job_id = answer["jobId"]
            row = wait_for_row(supabase_db, job_id)
            paths = [f"{user}/{job_id}_0.png", f"{user}/{job_id}_1.png"]
            assert row == ["completed", paths[0], ",".join(paths), ""], worker.output()
            for path in paths:
                assert cloud.objects[f"sdxl_image_fast/{path}"][1] == "image/png"

            refused, body = request(f"{edge.url}/functions/v1/queue-job",
                                    {"jobType": "sdxl_image_fast", "prompt": "x" * 5000},
                                    {"Authorization": f"Bearer {user_token(user)}"})
            assert refused == 400 and body["error"]
        finally:
            worker.stop()
            edge.stop()
