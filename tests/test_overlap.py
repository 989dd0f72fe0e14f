"""The Finisher (workers/runner.py): a job's upload and callback overlap the next job's generation,
through a real worker process and the Supabase stand-in holding the first upload for a while."""
from __future__ import annotations

import pytest

from tests.supabase_standin import SupabaseStandin
from tests.worker_harness import USER, WorkerProcess, contract_payload, push, wait_for, worker_env
from tools.small_catalog import write_small_job_types

HOLD = 3.0   # seconds the stand-in holds the first upload


@pytest.mark.parametrize("overlap", ["1", "0"])
def test_the_next_job_generates_while_the_last_one_uploads(tmp_path, redis_server, redis_client, tiny_sdxl, overlap):
    with SupabaseStandin(service_key="service-key-for-tests") as cloud:
        env = worker_env(redis_server.url, tmp_path / "data", write_small_job_types(tmp_path / "catalog", steps=2),
                         tiny_sdxl.single_file, tiny_sdxl.folder, SUPABASE_URL=cloud.url,
                         SUPABASE_SERVICE_KEY="service-key-for-tests", OVERLAP_FINISH=overlap)
        worker = WorkerProcess("image", env, tmp_path / "image.log").start()
        try:
            cloud.hang_next("/storage/v1/object/", 1, HOLD)
            first, second = (contract_payload(numImages=1, metadata={"num_images": 1}) for _ in range(2))
            push(redis_client, first)
            push(redis_client, second)
            records = [wait_for(redis_client, job["jobId"]) for job in (first, second)]
        finally:
            worker.stop()
        assert [r["status"] for r in records] == ["completed", "completed"]
        first_done, second_started = float(records[0]["completed_at"]), float(records[1]["started_at"])
        if overlap == "1":
            assert second_started < first_done - HOLD / 2, "the second job waited for the first one's upload"
        else:
            assert second_started >= first_done
        for job in (first, second):      # each completed callback names outputs the stand-in holds
            assert cloud.callbacks_for(job["jobId"])[-1]["imageUrls"] == [f"{USER}/{job['jobId']}_0.png"]
        assert not cloud.early_completions
