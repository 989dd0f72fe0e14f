"""Storage backends: local files (atomic, contained) and Supabase Storage through the loopback stand-in."""
from __future__ import annotations

import os
import threading

import pytest

from storage import LocalStorage, SupabaseStorage, make_storage
from storage.base import Storage, StorageError, check_segment, object_name
from tests.conftest import free_port
from tests.supabase_standin import STORAGE_PREFIX, SupabaseStandin
from workers.config import Settings

KEY = "service-key-for-tests"
PNG = b"\x89PNG\r\n\x1a\n" + b"pixels" * 10


@pytest.fixture
def cloud():
    with SupabaseStandin(service_key=KEY, buckets=["sdxl_image_fast", "video_fast"]) as standin:
        yield standin


def supabase(cloud, **kwargs) -> tuple[SupabaseStorage, list[float]]:
    sleeps: list[float] = []
    kwargs.setdefault("timeout", 5.0)
    return SupabaseStorage(cloud.url, KEY, sleep=sleeps.append, **kwargs), sleeps


# --- names ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["..", "a/b", "a\\b", "a\x00b", "", ".hidden", "a..b", "x" * 129, None, 7, "a b"])
def test_check_segment_rejects_unsafe(bad):
    with pytest.raises(StorageError) as err:
        check_segment(bad, "userId")
    assert err.value.retryable is False
    assert "userId" in str(err.value)


@pytest.mark.parametrize("good", ["abc", "job-1_2.png", "0b7e6c1e-5b1c-4f9e-9d2c-1a2b3c4d5e6f", "x" * 128])
def test_check_segment_accepts_safe(good):
    assert check_segment(good, "name") == good


def test_object_name_is_deterministic_per_job_and_index():
    assert object_name("job-1", 0, "png") == "job-1_0.png"
    assert object_name("job-1", 0, "png") == object_name("job-1", 0, "png")
    assert object_name("job-1", 1, "png") != object_name("job-1", 0, "png")
    assert object_name("job-1", 0, "mp4") == "job-1_0.mp4"
    for job_id, index, ext in [("../x", 0, "png"), ("job", -1, "png"), ("job", 0, "p/g"), ("job", True, "png")]:
        with pytest.raises(StorageError):
            object_name(job_id, index, ext)


# --- local ------------------------------------------------------------------------------------------
def test_local_upload_writes_and_returns_path_in_bucket(tmp_path):
    store = LocalStorage(tmp_path)
    assert isinstance(store, Storage)
    path = store.upload("sdxl_image_fast", "user-1", "job-1_0.png", PNG, "image/png")
    assert path == "user-1/job-1_0.png"
    assert (tmp_path / "sdxl_image_fast" / "user-1" / "job-1_0.png").read_bytes() == PNG
    assert store.read("sdxl_image_fast", path) == PNG


def test_local_second_run_overwrites_same_name(tmp_path):
    store = LocalStorage(tmp_path)
    name = object_name("job-1", 0, "png")
    first = store.upload("sdxl_image_fast", "user-1", name, b"first run", "image/png")
    second = store.upload("sdxl_image_fast", "user-1", name, b"second run", "image/png")
    assert first == second
    assert os.listdir(tmp_path / "sdxl_image_fast" / "user-1") == [name]
    assert store.read("sdxl_image_fast", second) == b"second run"


@pytest.mark.parametrize("bucket,user,filename", [
    ("..", "user", "f.png"), ("bucket", "..", "f.png"), ("bucket", "user", ".."), ("bucket", "a/b", "f.png"),
    ("bucket", "user", "a/../../f.png"), ("bucket", "user\x00", "f.png"), ("", "user", "f.png"),
    ("bucket", "", "f.png"), ("bucket", "user", ""),
])
def test_local_rejects_traversal(tmp_path, bucket, user, filename):
    root = tmp_path / "root"
    with pytest.raises(StorageError) as err:
        LocalStorage(root).upload(bucket, user, filename, PNG, "image/png")
    assert err.value.retryable is False
    assert not root.exists()  # nothing created anywhere


def test_local_rejects_symlink_out_of_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    (root / "bucket").mkdir(parents=True)
    (root / "bucket" / "user").symlink_to(outside)
    with pytest.raises(StorageError, match="outside the storage root"):
        LocalStorage(root).upload("bucket", "user", "f.png", PNG, "image/png")
    assert list(outside.iterdir()) == []


def test_local_failed_write_leaves_old_file_and_no_temp(tmp_path):
    store = LocalStorage(tmp_path)
    folder = tmp_path / "bucket" / "user"
    (folder / "taken.png").mkdir(parents=True)  # os.replace onto a folder fails
    with pytest.raises(StorageError) as err:
        store.upload("bucket", "user", "taken.png", PNG, "image/png")
    assert err.value.retryable is True
    assert os.listdir(folder) == ["taken.png"] and (folder / "taken.png").is_dir()
    with pytest.raises(StorageError):
        store.upload("bucket", "user", "f.png", "not bytes", "image/png")
    assert os.listdir(folder) == ["taken.png"]


def test_local_readers_never_see_a_partial_file(tmp_path):
    store = LocalStorage(tmp_path)
    versions = [b"A" * 400_000, b"B" * 400_000]
    store.upload("bucket", "user", "f.png", versions[0], "image/png")
    torn, reads, stop = [], [0], threading.Event()

    def reader():
        while not stop.is_set():
            content = store.read("bucket", "user/f.png")
            reads[0] += 1
            if content not in versions:
                torn.append(len(content))

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(40):
        store.upload("bucket", "user", "f.png", versions[i % 2], "image/png")
    stop.set()
    thread.join()
    assert reads[0] > 0 and torn == []
    assert os.listdir(tmp_path / "bucket" / "user") == ["f.png"]


# --- supabase ---------------------------------------------------------------------------------------
def test_supabase_upload_url_headers_and_body(cloud):
    store, sleeps = supabase(cloud)
    path = store.upload("sdxl_image_fast", "user-1", "job-1_0.png", PNG, "image/png")
    assert path == "user-1/job-1_0.png"
    assert cloud.objects["sdxl_image_fast/user-1/job-1_0.png"] == (PNG, "image/png")
    (request,) = cloud.requests
    assert request.method == "POST"
    assert request.path == "/storage/v1/object/sdxl_image_fast/user-1/job-1_0.png"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["apikey"] == KEY
    assert request.headers["content-type"] == "image/png"
    assert request.headers["x-upsert"] == "true"
    assert request.headers["cache-control"] == "3600"
    assert sleeps == []


def test_supabase_second_run_overwrites(cloud):
    store, _ = supabase(cloud)
    store.upload("video_fast", "u", "job_0.mp4", b"one", "video/mp4")
    store.upload("video_fast", "u", "job_0.mp4", b"two", "video/mp4")
    assert cloud.objects == {"video_fast/u/job_0.mp4": (b"two", "video/mp4")}


def test_standin_refuses_overwrite_without_upsert(cloud):
    import requests
    url = f"{cloud.url}{STORAGE_PREFIX}video_fast/u/f.mp4"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "video/mp4"}
    assert requests.post(url, data=b"1", headers=headers, timeout=5).status_code == 200
    second = requests.post(url, data=b"2", headers=headers, timeout=5)
    assert second.status_code == 409 and second.json()["error"] == "Duplicate"
    assert cloud.objects["video_fast/u/f.mp4"][0] == b"1"


def test_supabase_retries_503_then_succeeds(cloud):
    cloud.fail_next(STORAGE_PREFIX, 2, status=503)
    store, sleeps = supabase(cloud, backoff_base=0.5, backoff_cap=8)
    assert store.upload("sdxl_image_fast", "u", "f.png", PNG, "image/png") == "u/f.png"
    assert len(cloud.requests) == 3
    assert len(sleeps) == 2
    assert 0.25 <= sleeps[0] <= 0.5 and 0.5 <= sleeps[1] <= 1.0  # exponential with jitter
    assert cloud.objects["sdxl_image_fast/u/f.png"][0] == PNG


def test_supabase_retries_a_503_sent_as_http_400(cloud):
    """Storage's older answer: HTTP 400, the real code in the body's statusCode."""
    cloud.fail_next(STORAGE_PREFIX, 2, status=503, http_status=400)
    store, sleeps = supabase(cloud)
    assert store.upload("sdxl_image_fast", "u", "f.png", PNG, "image/png") == "u/f.png"
    assert len(cloud.requests) == 3 and len(sleeps) == 2
    cloud.fail_next(STORAGE_PREFIX, 1, status=403, http_status=400)      # a real refusal stays final
    with pytest.raises(StorageError) as err:
        store.upload("sdxl_image_fast", "u", "g.png", PNG, "image/png")
    assert err.value.retryable is False and "HTTP 400" in str(err.value)


@pytest.mark.parametrize("case", ["injected-400", "bad-key", "unknown-bucket"])
def test_supabase_never_retries_client_errors(cloud, case):
    key, bucket = KEY, "sdxl_image_fast"
    if case == "injected-400":
        cloud.fail_next(STORAGE_PREFIX, 5, status=400)
    elif case == "bad-key":
        key = "wrong-key"
    else:
        bucket = "no_such_bucket"
    sleeps: list[float] = []
    store = SupabaseStorage(cloud.url, key, timeout=5, sleep=sleeps.append)
    with pytest.raises(StorageError) as err:
        store.upload(bucket, "u", "f.png", PNG, "image/png")
    assert err.value.retryable is False
    assert len(cloud.requests) == 1 and sleeps == []
    expected = {"injected-400": "HTTP 400", "bad-key": "HTTP 401: Unauthorized: Invalid JWT",
                "unknown-bucket": "HTTP 404: Bucket not found"}[case]
    assert expected in str(err.value)
    assert cloud.objects == {}


def test_supabase_timeout_is_retried(cloud):
    cloud.hang_next(STORAGE_PREFIX, 1, seconds=0.6)
    store, sleeps = supabase(cloud, timeout=0.15)
    assert store.upload("sdxl_image_fast", "u", "f.png", PNG, "image/png") == "u/f.png"
    assert len(cloud.requests_to(STORAGE_PREFIX)) == 2 and len(sleeps) == 1
    assert cloud.objects["sdxl_image_fast/u/f.png"] == (PNG, "image/png")


def test_supabase_gives_up_after_max_attempts(cloud):
    cloud.fail_next(STORAGE_PREFIX, 100, status=503)
    store, sleeps = supabase(cloud, max_attempts=4, backoff_base=1, backoff_cap=2)
    with pytest.raises(StorageError) as err:
        store.upload("sdxl_image_fast", "u", "f.png", PNG, "image/png")
    assert err.value.retryable is True
    assert "after 4 attempts" in str(err.value) and "HTTP 503" in str(err.value)
    assert len(cloud.requests) == 4 and len(sleeps) == 3
    assert all(s <= 2 for s in sleeps)  # capped


def test_supabase_connection_refused_is_retryable():
    sleeps: list[float] = []
    store = SupabaseStorage(f"http://127.0.0.1:{free_port()}", KEY, timeout=2, max_attempts=3, sleep=sleeps.append)
    with pytest.raises(StorageError) as err:
        store.upload("sdxl_image_fast", "u", "f.png", PNG, "image/png")
    assert err.value.retryable is True and len(sleeps) == 2


def test_supabase_rejects_unsafe_segments_before_any_request(cloud):
    store, _ = supabase(cloud)
    with pytest.raises(StorageError):
        store.upload("sdxl_image_fast", "..", "f.png", PNG, "image/png")
    assert cloud.requests == []


def test_make_storage_picks_backend(tmp_path):
    local = make_storage(Settings.from_env({"DATA_DIR": str(tmp_path)}))
    assert isinstance(local, LocalStorage) and local.root == tmp_path.resolve() / "storage"
    remote = make_storage(Settings.from_env({"DATA_DIR": str(tmp_path), "SUPABASE_URL": "https://x.supabase.co/",
                                             "SUPABASE_SERVICE_KEY": KEY}))
    assert isinstance(remote, SupabaseStorage)
    assert remote.url == "https://x.supabase.co" and remote.service_key == KEY
