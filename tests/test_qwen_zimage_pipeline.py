"""workers/pipelines/qwen_image.py, z_image.py and lora.py on tiny random-weight checkpoints
(tests/fixtures/tiny_image_models.py), CPU, real diffusers and PEFT."""
from __future__ import annotations

import base64
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from tools.small_catalog import small_catalog
from workers.job import JobRejected, LoraRequest, parse_job
from workers.media import ImageLimits
from workers.pipelines.base import LoadOptions, ModelUnavailable
from workers.pipelines.lora import LoraLibrary
from workers.pipelines.qwen_image import QwenImageFamily, same_shape
from workers.pipelines.z_image import ZImageFamily

LIMITS = ImageLimits(max_bytes=1_000_000, max_pixels=1_000_000, timeout=5)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return small_catalog(tmp_path_factory.mktemp("catalog"), steps=2)


def options(path) -> LoadOptions:
    return LoadOptions(model_path=path, config_path=None, device="cpu", cache_dir=None)


@pytest.fixture(scope="module")
def library(tiny_image_models, tmp_path_factory):
    return LoraLibrary(tiny_image_models.loras, url_hosts=("127.0.0.1",), max_bytes=1_000_000,
                       download_dir=tmp_path_factory.mktemp("downloads"), timeout=5)


@pytest.fixture(scope="module")
def qwen(tiny_image_models, library):
    return QwenImageFamily.load(options(tiny_image_models.qwen), limits=LIMITS, loras=library, kind="qwen_image")


@pytest.fixture(scope="module")
def qwen_edit(tiny_image_models, library):
    return QwenImageFamily.load(options(tiny_image_models.qwen_edit), limits=LIMITS, loras=library,
                                kind="qwen_image_edit", max_references=3)


@pytest.fixture(scope="module")
def zimage(tiny_image_models, library):
    return ZImageFamily.load(options(tiny_image_models.zimage), limits=LIMITS, loras=library)


def make_job(catalog, job_type, **payload):
    base = {"jobId": "job-1", "userId": "user-1", "jobType": job_type, "prompt": "a lighthouse at dusk", "seed": 42}
    return parse_job({**base, **payload}, catalog)


def image_uri(size=(64, 64), color=(30, 140, 220), mode="RGB") -> str:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def run(family, job) -> list[np.ndarray]:
    family.check(job)
    return [np.asarray(image) for image in family.generate(job, lambda step, total: None)]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_qwen_text_to_image_batch_is_seeded_per_image(qwen, catalog):
    steps = []
    job = make_job(catalog, "qwen_image_2512", numImages=2)
    qwen.check(job)
    images = qwen.generate(job, lambda step, total: steps.append((step, total)))
    assert [image.size for image in images] == [(64, 64), (64, 64)] and steps == [(1, 2), (2, 2)]
    alone = run(qwen, make_job(catalog, "qwen_image_2512", numImages=1, seed=43))
    assert np.array_equal(alone[0], np.asarray(images[1]))      # image i is seed + i, reproducible alone
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_a_lora_is_active_for_its_job_only(qwen, catalog):
    """Same seed: no LoRA, with the LoRA, without again. First and last are bit-identical."""
    plain = make_job(catalog, "qwen_image_2512")
    before = run(qwen, plain)
    with_lora = run(qwen, make_job(catalog, "qwen_image_2512", loras=[{"name": "qwen-character", "weight": 0.8}]))
    after = run(qwen, plain)
    assert same(before, after)
    assert not same(before, with_lora)
    # Two LoRAs, then one of them: the other must not stay active either.
    both = run(qwen, make_job(catalog, "qwen_image_2512", loras=[{"name": "qwen-character", "weight": 0.8},
                                                                  {"name": "qwen-style"}]))
    one = run(qwen, make_job(catalog, "qwen_image_2512", loras=[{"name": "qwen-character", "weight": 0.8}]))
    assert same(one, with_lora) and not same(both, with_lora)
    assert same(run(qwen, plain), before)
    assert len(qwen.slots.loaded) == 2      # cached by content: loaded once each


def test_the_fast_tier_applies_its_lightning_lora_and_only_there(qwen, catalog):
    params = {"steps": 2, "guidance": 1.0}
    quality = make_job(catalog, "qwen_image_2512", params=params)
    before = run(qwen, quality)
    fast = run(qwen, make_job(catalog, "qwen_image_2512_fast", params=params))
    assert not same(before, fast)
    assert same(run(qwen, quality), before)


def test_zimage_turbo_and_its_lora_do_not_leak(zimage, catalog):
    job = make_job(catalog, "z_image_turbo", numImages=2)
    before = run(zimage, job)
    assert [image.shape for image in before] == [(64, 64, 3)] * 2
    with_lora = run(zimage, make_job(catalog, "z_image_turbo", numImages=2, loras=[{"name": "z-character"}]))
    assert not same(before, with_lora) and same(run(zimage, job), before)


def test_inpaint_and_edit_share_the_loaded_weights(qwen_edit, catalog):
    edit, inpaint = qwen_edit.variants["edit"], qwen_edit.variants["inpaint"]
    assert inpaint.transformer is edit.transformer and inpaint.vae is edit.vae   # from_pipe: one copy
    mask = image_uri(color=255, mode="L")
    images = run(qwen_edit, make_job(catalog, "qwen_image_inpaint_2511", initImage=image_uri(), maskImage=mask))
    assert [image.shape for image in images] == [(64, 64, 3)]
    # A landscape photo stays landscape (the type's 64² pixels, sides in multiples of 16), not stretched
    # to the type's square; a size the payload sets wins.
    wide, wide_mask = image_uri((96, 64)), image_uri((96, 64), color=255, mode="L")
    images = run(qwen_edit, make_job(catalog, "qwen_image_inpaint_2511", initImage=wide, maskImage=wide_mask))
    assert [image.shape for image in images] == [(48, 64, 3)]
    images = run(qwen_edit, make_job(catalog, "qwen_image_inpaint_2511", initImage=wide, maskImage=wide_mask,
                                     params={"width": 64, "height": 64}))
    assert [image.shape for image in images] == [(64, 64, 3)]
    # One edit generation (the pipeline encodes each picture at about 1024², the slow part on a CPU):
    # the output takes the picture's portrait shape.
    images = run(qwen_edit, make_job(catalog, "qwen_image_edit_2511", referenceImages=[image_uri((48, 80))],
                                     params={"guidance": 1.0}))
    assert [image.shape for image in images] == [(80, 48, 3)]


@pytest.mark.parametrize("job_type, payload, fragment", [
    ("qwen_image_inpaint_2511", {"initImage": image_uri(), "maskImage": image_uri((32, 32))},
     "the mask is 32x32, the image 64x64"),
    ("qwen_image_inpaint_2511", {"initImage": "data:image/png;base64,bm90IGFuIGltYWdl", "maskImage": image_uri()},
     "init image is not a decodable image"),
    ("qwen_image_edit_2511", {"referenceImages": [image_uri(), "data:image/png;base64,bm90IGFuIGltYWdl"]},
     "picture 2 is not a decodable image"),
    ("qwen_image_2512", {"loras": [{"name": "nobody"}]}, "unknown LoRA 'nobody'"),
    ("qwen_image_2512", {"loras": [{"name": "z-character"}]}, "does not fit qwen_image: it looks like a Z-Image LoRA"),
    ("qwen_image_2512", {"loras": [{"url": "https://elsewhere.example/x.safetensors"}]},
     "host 'elsewhere.example' is not allowed"),
])
def test_bad_inputs_are_refused_in_check(qwen, qwen_edit, catalog, job_type, payload, fragment):
    family = qwen_edit if job_type.startswith("qwen_image_edit") or "inpaint" in job_type else qwen
    with pytest.raises(ValueError) as info:
        family.check(make_job(catalog, job_type, **payload))
    assert fragment in str(info.value)


def test_same_shape_keeps_the_aspect_within_the_pixel_count():
    assert same_shape((1536, 1024), 1024 * 1024, 16) == (1248, 832)
    assert same_shape((1024, 1024), 1024 * 1024, 16) == (1024, 1024)
    assert same_shape((4000, 100), 1024 * 1024, 16) == (4096, 160)       # capped at the largest side
    assert same_shape((10, 5000), 64 * 64, 16) == (16, 256)             # a side held at 16: the other gives way


def test_refusals_before_the_worker(catalog):
    with pytest.raises(JobRejected, match="needs a mask"):
        make_job(catalog, "qwen_image_inpaint_2511", initImage=image_uri())
    with pytest.raises(JobRejected, match="needs 1 to 3 reference images"):
        make_job(catalog, "qwen_image_edit_2511", referenceImages=[image_uri()] * 4)
    with pytest.raises(JobRejected, match="needs 1 to 3 reference images"):
        make_job(catalog, "qwen_image_edit_2511")
    with pytest.raises(JobRejected, match="takes no LoRAs"):
        make_job(catalog, "video_fast", loras=[{"name": "qwen-character"}])
    with pytest.raises(JobRejected, match=r"loras\[0\].name"):
        make_job(catalog, "z_image_turbo", loras=[{"name": "../etc/passwd"}])
    with pytest.raises(JobRejected, match="at most 4"):
        make_job(catalog, "z_image_turbo", loras=[{"name": "a"}] * 5)
    assert make_job(catalog, "qwen_image_edit_2511", initImage=image_uri()).reference_images == (image_uri(),)


def test_a_checkpoint_of_the_wrong_kind_is_unavailable(tiny_image_models, tmp_path):
    with pytest.raises(ModelUnavailable, match="QwenImageEditPlusPipeline"):
        QwenImageFamily.load(options(tiny_image_models.qwen), kind="qwen_image_edit")
    with pytest.raises(ModelUnavailable, match="no Z-Image checkpoint"):
        ZImageFamily.load(options(tmp_path / "missing"))


class _Files(BaseHTTPRequestHandler):
    files: dict = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/redirect"):   # /redirect?to=URL
            self.send_response(302)
            self.send_header("Location", self.path.split("to=", 1)[1])
            self.send_header("Content-Length", "0")
            return self.end_headers()
        body = self.files.get(self.path)
        self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")


def test_a_lora_url_downloads_once_by_content_within_the_limit(library, tiny_image_models, qwen):
    data = (tiny_image_models.loras / "qwen-style.safetensors").read_bytes()
    handler = type("Files", (_Files,), {"files": {"/style.safetensors": data, "/big.safetensors": b"x" * 1_000_001}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        downloader = LoraLibrary(library.folder, url_hosts=("127.0.0.1",), max_bytes=1_000_000,
                                    download_dir=library.download_dir, timeout=5)
        resolved = downloader._download(f"{base}/style.safetensors")
        named = library.resolve(LoraRequest(name="qwen-style", url=None, weight=1.0))
        assert library.digest(resolved) == named.digest and resolved.name == f"{named.digest}.safetensors"
        with pytest.raises(ValueError, match="over the 1000000-byte limit"):
            downloader._download(f"{base}/big.safetensors")
        with pytest.raises(ValueError, match="HTTP 404"):
            downloader._download(f"{base}/missing.safetensors")
        # A redirect is followed to an allow-listed host only (hubs answer with their CDN's address).
        assert downloader._download(f"{base}/redirect?to={base}/style.safetensors") == resolved
        with pytest.raises(ValueError, match="host 'localhost' is not allowed"):
            downloader._download(f"{base}/redirect?to=http://localhost:{server.server_port}/style.safetensors")
        # An allow-listed name after a backslash: requests would connect to the host before it.
        other = LoraLibrary(library.folder, url_hosts=("huggingface.co",), max_bytes=1_000_000,
                            download_dir=library.download_dir, timeout=5)
        with pytest.raises(ValueError, match="backslash"):
            other._download(f"http://127.0.0.1:{server.server_port}\\@huggingface.co/style.safetensors")
    finally:
        server.shutdown()
