"""workers/pipelines/residency.py: three tiny models (Qwen-Image, Z-Image, SDXL) under a budget that
fits two. Eviction order, cold / warm / resident reports, and outputs after a swap equal those before."""
from __future__ import annotations

import numpy as np
import torch
import pytest

from tools.small_catalog import small_catalog
from workers.job import parse_job
from workers.pipelines.base import GenerationOutOfMemory, LoadOptions, ModelUnavailable
from workers.pipelines.host_copy import HostCopy
from workers.pipelines.lora import LoraLibrary
from workers.pipelines.qwen_image import QwenImageFamily
from workers.pipelines.residency import Residency, ResidentFamilies, family_modules, weight_bytes
from workers.pipelines.sdxl import SDXLFamily
from workers.pipelines.z_image import ZImageFamily


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return small_catalog(tmp_path_factory.mktemp("catalog"), steps=2)


@pytest.fixture
def loads(tiny_image_models, tiny_sdxl):
    """Loaders as the image worker builds them, counting how often each reads its checkpoint."""
    counts = {"qwen": 0, "zimage": 0, "sdxl": 0}

    def opts(path):
        return LoadOptions(model_path=path, config_path=None, device="cpu", cache_dir=None)

    def counted(key, load):
        def loader():
            counts[key] += 1
            return load()
        return loader

    loaders = {
        "qwen": counted("qwen", lambda: QwenImageFamily.load(opts(tiny_image_models.qwen), kind="qwen_image")),
        "zimage": counted("zimage", lambda: ZImageFamily.load(opts(tiny_image_models.zimage))),
        "sdxl": counted("sdxl", lambda: SDXLFamily.load(opts(tiny_sdxl.folder))),
    }
    return loaders, counts


def job(catalog, job_type, seed=7):
    return parse_job({"jobId": f"job-{job_type}-{seed}", "userId": "u", "jobType": job_type, "prompt": "a boat",
                      "seed": seed, "numImages": 1}, catalog)


def run(families, key, job) -> np.ndarray:
    fields = {}

    def on_step(step, total):
        pass

    on_step.record = fields.update
    families[key].check(job)
    image = families[key].generate(job, on_step)[0]
    return np.asarray(image), fields


def sizes(loaders) -> dict[str, int]:
    return {key: weight_bytes(family_modules(load())) for key, load in loaders.items()}


def test_three_models_in_a_budget_for_two(loads, catalog):
    loaders, counts = loads
    size = sizes(loaders)
    counts.update(dict.fromkeys(counts, 0))
    two_largest = sum(sorted(size.values())[1:])
    states: dict[str, str] = {}
    residency = Residency(loaders, "cpu", budget_bytes=two_largest, host_reserve_bytes=0)
    residency.publish_to(states)
    families = ResidentFamilies(residency)
    assert states == dict.fromkeys(loaders, "not loaded")

    qwen_job, z_job, sdxl_job = job(catalog, "qwen_image_2512"), job(catalog, "z_image_turbo"), job(catalog, "sdxl_image_fast")
    qwen_first, report = run(families, "qwen", qwen_job)
    assert report["residency"] == "cold" and report["swap_ms"] > 0 and report["evicted"] is None
    z_first, report = run(families, "zimage", z_job)
    assert report["residency"] == "cold" and residency.resident_keys() == ["qwen", "zimage"]
    assert run(families, "qwen", qwen_job)[1]["residency"] == "resident"

    # SDXL needs room: the least recently used (Z-Image) leaves the device, Qwen stays.
    _, report = run(families, "sdxl", sdxl_job)
    assert report["residency"] == "cold" and report["evicted"] == ["zimage"]
    assert residency.evictions == ["zimage"] and states["zimage"].startswith("warm")
    assert states["qwen"].startswith("resident") and states["sdxl"].startswith("resident")

    # Back to Z-Image: warm (from CPU memory, not from disk); now Qwen is the least recently used.
    z_again, report = run(families, "zimage", z_job)
    assert report == {"residency": "warm", "swap_ms": report["swap_ms"], "evicted": ["qwen"]}
    qwen_again, report = run(families, "qwen", qwen_job)
    assert report["residency"] == "warm" and report["evicted"] == ["sdxl"]
    assert residency.evictions == ["zimage", "qwen", "sdxl"]
    assert counts == {"qwen": 1, "zimage": 1, "sdxl": 1}     # each checkpoint read once
    assert np.array_equal(z_again, z_first) and np.array_equal(qwen_again, qwen_first)


def test_short_of_ram_a_model_is_dropped_and_reloads_cold(loads, catalog):
    loaders, counts = loads
    size = sizes(loaders)
    budget = max(size["zimage"], size["qwen"])       # one of the two at a time
    counts.update(dict.fromkeys(counts, 0))
    residency = Residency(loaders, "cpu", budget_bytes=budget, host_reserve_bytes=1 << 60)   # never enough RAM
    families = ResidentFamilies(residency)
    first, _ = run(families, "zimage", job(catalog, "z_image_turbo"))
    run(families, "qwen", job(catalog, "qwen_image_2512"))
    assert residency.entries["zimage"].family is None and residency.states["zimage"] == "not loaded"
    again, report = run(families, "zimage", job(catalog, "z_image_turbo"))
    assert report["residency"] == "cold" and counts["zimage"] == 2
    assert np.array_equal(again, first)


def test_no_budget_keeps_everything_and_a_missing_checkpoint_fails_its_jobs(loads, catalog, tmp_path):
    loaders, _ = loads
    missing = {"gone": lambda: ZImageFamily.load(LoadOptions(model_path=tmp_path / "nope", config_path=None,
                                                             device="cpu", cache_dir=None))}
    residency = Residency({**loaders, **missing}, "cpu", budget_bytes=None)
    families = ResidentFamilies(residency)
    for key in loaders:
        residency.make_resident(key)
    assert residency.resident_keys() == list(loaders) and residency.evictions == []
    with pytest.raises(ModelUnavailable, match="no Z-Image checkpoint"):
        families["gone"].check(job(catalog, "z_image_turbo"))
    residency.forget("gone")
    assert "gone" not in residency.states


def test_kept_host_copies_copy_only_what_changed(tiny_image_models, catalog, tmp_path, monkeypatch):
    """host_copies=True on the CPU: the CUDA path's bookkeeping. A model's host copy is made at its first
    eviction; later ones copy only its new LoRA adapter, then nothing, and need no RAM to spare."""
    library = LoraLibrary(tiny_image_models.loras, url_hosts=("127.0.0.1",), max_bytes=1_000_000,
                          download_dir=tmp_path, timeout=5)

    def opts(path):
        return LoadOptions(model_path=path, config_path=None, device="cpu", cache_dir=None)

    loaders = {"qwen": lambda: QwenImageFamily.load(opts(tiny_image_models.qwen), kind="qwen_image"),
               "zimage": lambda: ZImageFamily.load(opts(tiny_image_models.zimage), loras=library)}
    copied: list[int] = []
    store = HostCopy.store
    monkeypatch.setattr(HostCopy, "store", lambda self, modules: copied.append(store(self, modules)) or copied[-1])
    size = sizes(loaders)
    residency = Residency(loaders, "cpu", budget_bytes=max(size.values()), host_reserve_bytes=0, host_copies=True)
    families = ResidentFamilies(residency)
    z_job, q_job = job(catalog, "z_image_turbo"), job(catalog, "qwen_image_2512")
    z_lora = parse_job({"jobId": "job-z-lora", "userId": "u", "jobType": "z_image_turbo", "prompt": "a boat",
                        "seed": 7, "numImages": 1, "loras": [{"name": "z-character"}]}, catalog)

    z_first, _ = run(families, "zimage", z_job)
    q_first, _ = run(families, "qwen", q_job)              # Z-Image out: its host copies made, every byte
    kept = sum(residency.hosts[id(m)][1].nbytes for m in residency.entries["zimage"].modules)
    assert sum(copied) == size["zimage"] and kept >= size["zimage"]

    residency.host_reserve = 1 << 60                        # no RAM to spare from here on
    stores = len(copied)
    with_lora, report = run(families, "zimage", z_lora)    # Qwen has no host copy: dropped
    assert report["residency"] == "warm" and report["evicted"] == ["qwen"]
    assert residency.entries["qwen"].family is None and len(copied) == stores
    assert not np.array_equal(with_lora, z_first)

    stores = len(copied)
    q_again, report = run(families, "qwen", q_job)         # Z-Image out again: kept, only the adapter copied
    assert report["residency"] == "cold" and residency.entries["zimage"].where == "host"
    assert 0 < sum(copied[stores:]) < size["zimage"] / 10

    z_again, report = run(families, "zimage", z_job)       # adapter loaded but off: the first image again
    assert report["residency"] == "warm" and np.array_equal(z_again, z_first)
    stores = len(copied)
    run(families, "qwen", q_job)
    assert len(copied) > stores and sum(copied[stores:]) == 0   # nothing changed on the device
    assert residency.entries["zimage"].where == "host"
    assert np.array_equal(run(families, "zimage", z_lora)[0], with_lora)
    assert np.array_equal(q_again, q_first)


def test_identical_text_encoders_are_one_module_and_stay_while_their_other_model_swaps(tiny_image_models, catalog):
    """Qwen-Image and Qwen-Image-Edit ship the same text encoder and VAE: loaded with one `shared`
    dict they are the same modules. Under a budget for one model (its own transformer beside the
    shared parts) a swap moves only the transformers; the shared parts never leave, and outputs
    after the swaps equal the first ones bit for bit (host_copies=True: the CUDA path's bookkeeping)."""
    import base64
    import io

    from PIL import Image

    shared: dict = {}

    def opts(path):
        return LoadOptions(model_path=path, config_path=None, device="cpu", cache_dir=None)

    loaders = {"qwen": lambda: QwenImageFamily.load(opts(tiny_image_models.qwen), kind="qwen_image", shared=shared),
               "edit": lambda: QwenImageFamily.load(opts(tiny_image_models.qwen_edit), kind="qwen_image_edit",
                                                    shared=shared)}
    residency = Residency(loaders, "cpu", host_reserve_bytes=0, host_copies=True)
    qwen, edit = residency.loaded("qwen"), residency.loaded("edit")
    assert qwen.pipe.text_encoder is edit.pipe.text_encoder and qwen.pipe.vae is edit.pipe.vae
    assert qwen.pipe.transformer is not edit.pipe.transformer
    own = {k: weight_bytes([f.pipe.transformer]) for k, f in (("qwen", qwen), ("edit", edit))}
    common = weight_bytes([qwen.pipe.text_encoder, qwen.pipe.vae])
    residency.budget = common + max(own.values()) + min(own.values()) // 2   # one transformer at a time
    families = ResidentFamilies(residency)

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buf, format="PNG")
    picture = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    edit_job = parse_job({"jobId": "job-edit", "userId": "u", "jobType": "qwen_image_edit_2511", "prompt": "bluer",
                          "seed": 3, "numImages": 1, "referenceImages": [picture]}, catalog)
    q_job = job(catalog, "qwen_image_2512")

    def address(module):
        return next(module.parameters()).data_ptr()

    text_encoder_at = address(qwen.pipe.text_encoder)
    q_first, _ = run(families, "qwen", q_job)
    e_first, report = run(families, "edit", edit_job)
    assert report["evicted"] == ["qwen"] and residency.entries["qwen"].where == "host"
    assert residency._needed("qwen") == own["qwen"]            # only its transformer would come back
    assert id(qwen.pipe.transformer) in residency.hosts and id(qwen.pipe.text_encoder) not in residency.hosts
    assert address(qwen.pipe.text_encoder) == text_encoder_at  # the shared parts did not move
    q_again, report = run(families, "qwen", q_job)
    assert report["evicted"] == ["edit"] and address(qwen.pipe.text_encoder) == text_encoder_at
    e_again, _ = run(families, "edit", edit_job)
    assert np.array_equal(q_again, q_first) and np.array_equal(e_again, e_first)


def test_start_up_plan_counts_a_shared_text_encoder_once(tiny_image_models):
    from workers.image_worker import disk_bytes

    def weights(folder):
        return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))

    qwen, edit = tiny_image_models.qwen, tiny_image_models.qwen_edit
    counted: set = set()
    together = disk_bytes(qwen, counted) + disk_bytes(edit, counted)
    shared = weights(edit / "text_encoder") + weights(edit / "vae")
    assert shared > 0 and together == disk_bytes(qwen) + disk_bytes(edit) - shared


def test_a_model_pinned_by_its_deferred_cuda_graphs_gives_back_its_host_copy(tiny_image_models, catalog):
    """CUDA graphs (GPU only) pin a model to the device for good: the host copy made when it was
    moved out earlier is never used again and must not hold RAM. The capture is stood in for here."""
    def opts(path):
        return LoadOptions(model_path=path, config_path=None, device="cpu", cache_dir=None)

    loaders = {"qwen": lambda: QwenImageFamily.load(opts(tiny_image_models.qwen), kind="qwen_image"),
               "zimage": lambda: ZImageFamily.load(opts(tiny_image_models.zimage))}
    size = sizes(loaders)
    residency = Residency(loaders, "cpu", budget_bytes=max(size.values()), host_reserve_bytes=0, host_copies=True)
    families = ResidentFamilies(residency)
    run(families, "zimage", job(catalog, "z_image_turbo"))
    run(families, "qwen", job(catalog, "qwen_image_2512"))        # Z-Image out: its host copy made
    run(families, "zimage", job(catalog, "z_image_turbo"))        # back on the device, the copy kept
    z_modules = {id(m) for m in residency.entries["zimage"].modules}
    assert z_modules & set(residency.hosts)

    family = residency.entries["zimage"].family

    class CapturesGraphs:
        def accelerate_deferred(self, pause):
            family.graphed = object()            # what SDXL's capture leaves behind
            return {"applied": "cuda graphs"}

    family.deferred = CapturesGraphs()
    family.accelerate_deferred = lambda pause: family.deferred.accelerate_deferred(pause)
    assert families["zimage"].accelerate_deferred() == {"applied": "cuda graphs"}
    assert not z_modules & set(residency.hosts)                  # released
    assert residency.entries["zimage"].where == "device"


def test_a_model_that_loads_onto_a_full_device_moves_the_others_out_and_loads(tiny_image_models, catalog):
    """SDXL's loader places it on the device itself, before any room is made: on a full card that
    load runs out of memory. The others move out and it loads; a second failure reaches the job as
    out of memory (the runner's branch), not as an internal error. The CUDA error is stood in for."""
    def opts(path):
        return LoadOptions(model_path=path, config_path=None, device="cpu", cache_dir=None)

    failures = []

    def zimage_on_a_full_card(fail_times: int):
        def load():
            if len(failures) < fail_times:
                failures.append("oom")
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB")
            return ZImageFamily.load(opts(tiny_image_models.zimage))
        return load

    loaders = {"qwen": lambda: QwenImageFamily.load(opts(tiny_image_models.qwen), kind="qwen_image"),
               "zimage": zimage_on_a_full_card(1)}
    residency = Residency(loaders, "cpu", budget_bytes=1 << 40, host_reserve_bytes=0)
    families = ResidentFamilies(residency)
    run(families, "qwen", job(catalog, "qwen_image_2512"))
    images, report = run(families, "zimage", job(catalog, "z_image_turbo"))
    assert failures == ["oom"] and residency.entries["qwen"].where != "device" and report["residency"] == "cold"

    failures.clear()
    residency = Residency({"qwen": loaders["qwen"], "zimage": zimage_on_a_full_card(2)}, "cpu", budget_bytes=1 << 40,
                          host_reserve_bytes=0)
    families = ResidentFamilies(residency)
    run(families, "qwen", job(catalog, "qwen_image_2512"))
    with pytest.raises(GenerationOutOfMemory, match="out of GPU memory loading zimage: CUDA out of memory"):
        families["zimage"].check(job(catalog, "z_image_turbo"))
