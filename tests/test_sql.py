"""sql/ migrations on a real PostgreSQL: schema, generated job types, RLS, queue figures, storage."""
from __future__ import annotations

import json
import uuid

from tests.supabase.fixtures import migrations, postgres_server, supabase_db  # noqa: F401
from workers.config import load_catalog

CATALOG = load_catalog()


def insert_job(db, user_id: str, job_type: str = "sdxl_image_fast", status: str = "queued",
               created: str = "now()", started: str = "null", completed: str = "null", metadata: str = "{}") -> str:
    job_id = str(uuid.uuid4())
    db.psql(f"insert into public.jobs (id, user_id, job_type, status, created_at, started_at, completed_at, metadata) "
            f"values ('{job_id}', '{user_id}', '{job_type}', '{status}', {created}, {started}, {completed}, "
            f"'{metadata}'::jsonb)")
    return job_id


def scalar(db, sql: str) -> str:
    rows = db.query(sql)
    return rows[0][0] if rows else ""


def test_migrations_are_timestamped_and_describe_their_guarantees():
    files = migrations()
    assert len(files) >= 4
    for path in files:
        assert path.name[:14].isdigit() and path.name[14] == "_", path.name
        text = path.read_text()
        assert "Guarantees:" in text.split("\n\n")[0], f"{path.name} must open with what it guarantees"


def test_migrations_can_be_applied_twice(supabase_db):
    user = supabase_db.create_user()
    job = insert_job(supabase_db, user)
    for path in migrations():
        supabase_db.server.psql_file(path, db=supabase_db.name)
    assert scalar(supabase_db, f"select status from jobs where id = '{job}'") == "queued"


def test_job_type_constraint_matches_job_types_yaml(supabase_db):
    user = supabase_db.create_user()
    for name in CATALOG.job_types:
        insert_job(supabase_db, user, name)
    bad = supabase_db.psql(f"insert into jobs (user_id, job_type) values ('{user}', 'not_a_type')", check=False)
    assert bad.returncode != 0 and "valid_job_types" in bad.stderr


def test_worker_type_and_queue_come_from_the_catalog(supabase_db):
    user = supabase_db.create_user()
    for name, spec in CATALOG.job_types.items():
        job = insert_job(supabase_db, user, name)
        worker = CATALOG.workers[spec.worker]
        row = supabase_db.query(f"select worker_type, queue from jobs where id = '{job}'")[0]
        assert row == [worker.worker_type, worker.queue], name
    assert {r[0] for r in supabase_db.query("select worker_type from jobs where job_type like 'sdxl_%'")} == {"SDXL"}


def test_status_check_and_monotonic_transitions(supabase_db):
    user = supabase_db.create_user()
    job = insert_job(supabase_db, user)
    assert supabase_db.psql(f"update jobs set status = 'done' where id = '{job}'", check=False).returncode != 0
    supabase_db.psql(f"update jobs set status = 'processing' where id = '{job}'")
    back = supabase_db.psql(f"update jobs set status = 'queued' where id = '{job}'", check=False)
    assert back.returncode != 0 and "cannot become queued" in back.stderr
    supabase_db.psql(f"update jobs set status = 'completed' where id = '{job}'")
    for status in ("processing", "failed", "queued"):
        result = supabase_db.psql(f"update jobs set status = '{status}' where id = '{job}'", check=False)
        assert result.returncode != 0 and "cannot become" in result.stderr
    supabase_db.psql(f"update jobs set status = 'completed', file_path = 'x/y.png' where id = '{job}'")


def test_rls_user_reads_only_own_jobs(supabase_db):
    alice, bob = supabase_db.create_user(), supabase_db.create_user()
    job_a, job_b = insert_job(supabase_db, alice), insert_job(supabase_db, bob)
    seen = supabase_db.as_user(alice, "select id from jobs order by id").stdout.split()
    assert seen == [job_a]
    assert job_b not in supabase_db.as_user(alice, f"select id from jobs where id = '{job_b}'").stdout
    assert supabase_db.as_user(None, "select count(*) from jobs", role="anon", check=False).returncode != 0


def test_rls_users_cannot_insert_update_or_delete(supabase_db):
    alice = supabase_db.create_user()
    job = insert_job(supabase_db, alice)
    attempts = [
        f"insert into jobs (user_id, job_type) values ('{alice}', 'sdxl_image_fast')",
        f"update jobs set status = 'completed' where id = '{job}'",
        f"delete from jobs where id = '{job}'",
        "insert into job_type_catalog values ('x', 'q', 'W', 'image', 1, 1, 1)",
    ]
    for sql in attempts:
        result = supabase_db.as_user(alice, sql, check=False)
        assert result.returncode != 0 and "permission denied" in result.stderr, sql
    assert scalar(supabase_db, f"select status from jobs where id = '{job}'") == "queued"
    # The service role (the edge functions) may write.
    supabase_db.as_user(None, f"update jobs set status = 'processing' where id = '{job}'", role="service_role")
    assert scalar(supabase_db, f"select status from jobs where id = '{job}'") == "processing"


def test_queue_position_counts_older_queued_jobs_of_the_same_queue(supabase_db):
    alice, bob = supabase_db.create_user(), supabase_db.create_user()
    base = "now() - interval '10 minutes'"
    first = insert_job(supabase_db, bob, "sdxl_image_fast", created=f"{base} + interval '1 second'")
    second = insert_job(supabase_db, alice, "sdxl_image_high", created=f"{base} + interval '2 seconds'")
    insert_job(supabase_db, bob, "video_fast", created=base)  # other queue: not ahead
    third = insert_job(supabase_db, alice, "sdxl_image_fast", created=f"{base} + interval '3 seconds'")
    running = insert_job(supabase_db, bob, "sdxl_image_fast", status="processing", created=base, started="now()")
    assert scalar(supabase_db, f"select job_queue_position('{first}')") == "1"
    assert scalar(supabase_db, f"select job_queue_position('{second}')") == "2"
    assert scalar(supabase_db, f"select job_queue_position('{third}')") == "3"
    assert scalar(supabase_db, f"select job_queue_position('{running}')") == "0"
    # As alice: her own jobs only; bob's job gives nothing.
    assert supabase_db.as_user(alice, f"select job_queue_position('{third}')").stdout.strip() == "3"
    assert supabase_db.as_user(alice, f"select job_queue_position('{first}')").stdout.strip() == ""
    rows = supabase_db.as_user(alice, "select job_id, queue, queue_position from my_active_jobs()").stdout.split()
    assert rows == [f"{second}|sdxl_queue|2", f"{third}|sdxl_queue|3"]


def test_estimate_uses_expected_seconds_then_measured_durations(supabase_db):
    user = supabase_db.create_user()
    expected = CATALOG.job_types["image_fast"].expected_seconds
    assert float(scalar(supabase_db, "select job_type_estimate_seconds('image_fast')")) == expected
    for secs in (40, 50, 60, 500):  # median 55; older than 7 days is ignored
        insert_job(supabase_db, user, "image_fast", status="completed", started=f"now() - interval '{secs} seconds'",
                   completed="now()")
    insert_job(supabase_db, user, "image_fast", status="completed", started="now() - interval '8 days'",
               completed="now() - interval '8 days' + interval '1000 seconds'")
    assert float(scalar(supabase_db, "select job_type_estimate_seconds('image_fast')")) == 55.0
    assert supabase_db.as_user(None, "select job_type_estimate_seconds('image_fast')", role="anon").stdout.strip() == "55"


def test_runs_as_the_fallback_do_not_count_in_the_estimate(supabase_db):
    user = supabase_db.create_user()
    for secs in (4, 5, 6):
        insert_job(supabase_db, user, "sdxl_image_high", status="completed",
                   started=f"now() - interval '{secs} seconds'", completed="now()")
    for _ in range(3):   # the image worker was down: the Wan worker rendered these, slowly
        insert_job(supabase_db, user, "sdxl_image_high", status="completed", started="now() - interval '90 seconds'",
                   completed="now()", metadata='{"fallback": {"from": "sdxl_image_high", "reason": "down"}}')
    assert float(scalar(supabase_db, "select job_type_estimate_seconds('sdxl_image_high')")) == 5.0


def test_estimated_wait_adds_the_queue_ahead(supabase_db):
    alice, bob = supabase_db.create_user(), supabase_db.create_user()
    fast = CATALOG.job_types["sdxl_image_fast"].expected_seconds
    high = CATALOG.job_types["sdxl_image_high"].expected_seconds
    base = "now() - interval '1 minute'"
    insert_job(supabase_db, bob, "sdxl_image_high", status="processing", created=base, started="now()")
    insert_job(supabase_db, bob, "sdxl_image_high", created=f"{base} + interval '1 second'")
    mine = insert_job(supabase_db, alice, "sdxl_image_fast", created=f"{base} + interval '2 seconds'")
    wait = float(supabase_db.as_user(alice, f"select job_estimated_seconds('{mine}')").stdout)
    assert abs(wait - (high + high + fast)) < 1.0
    status = json.loads(supabase_db.as_user(alice, f"select job_status('{mine}')").stdout)
    assert status["jobId"] == mine and status["queuePosition"] == 2 and status["workerType"] == "SDXL"
    assert status["status"] == "queued" and abs(status["estimatedTime"] - wait) < 1.0
    supabase_db.psql(f"update jobs set status = 'completed' where id = '{mine}'")
    assert float(scalar(supabase_db, f"select job_estimated_seconds('{mine}')")) == 0
    assert supabase_db.as_user(bob, f"select job_status('{mine}')").stdout.strip() == ""


def test_storage_buckets_follow_the_catalog(supabase_db):
    rows = {r[0]: r[1:] for r in supabase_db.query(
        "select id, public, file_size_limit, array_to_string(allowed_mime_types, ',') from storage.buckets")}
    for name, spec in CATALOG.job_types.items():
        for bucket in spec.buckets:
            public, size, mimes = rows[bucket]
            assert public == "f"
            assert int(size) == (20 if spec.quality == "fast" else 30) * 1024 * 1024, bucket
            assert mimes == ("image/png" if spec.content == "image" else "video/mp4,image/jpeg")  # + thumbnails


def test_storage_policy_user_reads_only_own_folder(supabase_db):
    alice, bob = supabase_db.create_user(), supabase_db.create_user()
    supabase_db.psql(
        "insert into storage.objects (bucket_id, name) values "
        f"('sdxl_image_fast', '{alice}/a.png'), ('sdxl_image_fast', '{bob}/b.png'), ('video_fast', '{alice}/v.mp4')")
    names = supabase_db.as_user(alice, "select name from storage.objects order by name").stdout.split()
    assert names == [f"{alice}/a.png", f"{alice}/v.mp4"]
    for sql in (f"insert into storage.objects (bucket_id, name) values ('sdxl_image_fast', '{alice}/c.png')",
                f"update storage.objects set name = '{alice}/z.png' where name = '{alice}/a.png' returning id",
                f"delete from storage.objects where name = '{alice}/a.png' returning id"):
        result = supabase_db.as_user(alice, sql, check=False)
        assert result.returncode != 0 or result.stdout.strip() == "", sql
    assert int(scalar(supabase_db, "select count(*) from storage.objects")) == 3
