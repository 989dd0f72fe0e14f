"""Fuzz: hypothesis-generated payloads, each wrong in at least one way, pushed onto the live queues.

Required: no worker crash, a clear failed status (record and callback) for every payload that
carries a usable jobId, a dead letter for every one that does not, and no file anywhere but
{bucket}/{userId}/ for the valid control jobs mixed in.
"""
from __future__ import annotations

import base64
import io
import json
import math
import random
import re
import struct
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from PIL import Image

from tests.reliability import Config
from tests.reliability.daemon import USER, Daemon, eventually, payload
from tests.reliability.figures import Figures, settle_local, tally_local
from tests.reliability.scenarios import _check_end_state
from tools.small_catalog import small_catalog

SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")   # CONTRACT.md: one storage path segment
DELETE = object()                                            # "remove the key" in a mutation
IGNORED = ("width", "height", "steps", "frames", "num_frames", "fps", "guidance", "cfg", "lora_id", "format",
           "quality", "modelVariant", "isSDXL", "characterId", "imageId", "videoId", "timestamp", "extra")
CONTROL_EVERY = 50   # one valid job among this many payloads


def _unsafe(value: str) -> bool:
    return not SAFE.match(value) or ".." in value


def _png(width: int, height: int) -> bytes:
    """A PNG header claiming width × height over a zlib bomb: a few KB that would inflate to MBs."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4_000_000, 9))
            + chunk(b"IEND", b""))


def _uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _good_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


GOOD_IMAGE = _uri(_good_png())
GIF_BOMB = b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x80\x00\x00" + b"\x00" * 6 + b",\x00\x00\x00\x00\xff\xff\xff\xff\x00\x02\x02D\x01\x00;"
BMP_BOMB = b"BM" + struct.pack("<IHHI", 0, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, 30000, 30000, 1, 24, 0, 0, 0, 0, 0, 0)

TEXT = st.one_of(st.text(st.characters(codec=None, categories=None), max_size=30),
                 st.tuples(st.text(max_size=5), st.sampled_from(["\ud800", "\udfff", "\x00", "\u202e", "😀"]))
                 .map("".join))
TRAVERSAL = st.randoms(use_true_random=True).map(lambda r: r.choice(TRAVERSALS))
TRAVERSALS = (["..", "../..", "../../etc/passwd", "a/../../b", "/etc/passwd", "x\\..\\y", ".hidden",
                             "a\x00b", "..%2f..%2f", "%2e%2e", "~root", " ", "a b", "a/b", "./a", "ü", "a" * 129, "\ud800"])
JUNK = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=10)
NON_STRING = st.one_of(st.integers(), st.floats(), st.booleans(), st.lists(JUNK, min_size=1, max_size=3),
                       st.dictionaries(TEXT, JUNK, min_size=1, max_size=3))
NOT_INTEGRAL = st.floats(allow_nan=True, allow_infinity=True).filter(lambda f: not math.isfinite(f) or f != int(f))
LETTERS = st.text(alphabet="abcxyz!?#", min_size=1, max_size=8)
BAD_COUNT = st.one_of(st.integers(max_value=0), st.integers(min_value=9), NOT_INTEGRAL, st.booleans(), LETTERS,
                      st.integers(min_value=9).map(str), st.lists(st.integers(), max_size=2), st.dictionaries(TEXT, JUNK, max_size=2))
BAD_SEED = st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32), NOT_INTEGRAL, st.booleans(), LETTERS,
                     st.lists(st.integers(), max_size=2))
HUGE_TEXT = st.one_of(st.integers(2001, 20_000), st.integers(20_000, 400_000)).map(lambda n: "x" * n)
BAD_IMAGE = st.one_of(
    st.sampled_from([_uri(_png(50_000, 50_000)), _uri(_png(4097, 4097)), _uri(GIF_BOMB, "image/gif"),
                     _uri(BMP_BOMB, "image/bmp"), _uri(_good_png()[:60]), "data:image/png;base64,",
                     "data:text/html;base64,PGgxPg==", "data:image/png,notbase64", "ftp://x/y.png",
                     "file:///etc/passwd", "javascript:alert(1)", "http://127.0.0.1:9/x.png", "https://127.0.0.1:9/x.png"]),
    st.binary(max_size=64).map(_uri),
    TEXT.map(lambda t: "data:image/png;base64," + t + "!"),
    NON_STRING)
BAD_STRENGTH = st.one_of(st.floats(max_value=0), st.floats(min_value=1, exclude_min=True), st.booleans(), LETTERS,
                         st.lists(st.floats(), max_size=2), st.just(float("nan")))


@dataclass
class Case:
    queue: str
    raw: bytes
    job_id: str | None        # set when the payload carries a usable jobId
    control: bool = False     # a valid job: must complete


def _mutations(job_type: str, buckets: set[str], known: set[str]) -> dict:
    """Field → strategy of a value that makes the payload invalid (DELETE removes the field)."""
    table = {
        "jobType": st.one_of(NON_STRING, st.sampled_from(["", DELETE]), TEXT.filter(lambda t: t not in known), TRAVERSAL),
        "userId": st.one_of(TRAVERSAL, TEXT.filter(_unsafe), NON_STRING, st.sampled_from(["", None, DELETE])),
        "bucket": st.one_of(TRAVERSAL, TEXT.filter(lambda t: t and t not in buckets),
                            st.one_of(st.integers(min_value=1), st.just(True), st.lists(JUNK, min_size=1, max_size=2))),
        "prompt": st.one_of(NON_STRING.filter(lambda v: v is not None), HUGE_TEXT),
        "negativePrompt": st.one_of(NON_STRING, HUGE_TEXT),
        "metadata.num_images": BAD_COUNT,
        "seed": BAD_SEED,
        "metadata": st.one_of(st.lists(JUNK, max_size=3), TEXT, st.integers(), st.booleans()),
    }
    if job_type == "sdxl_img2img":
        table.update({"initImage": BAD_IMAGE, "strength": BAD_STRENGTH})
    return table


def _apply(body: dict, field: str, value) -> None:
    target, key = (body["metadata"], field.split(".", 1)[1]) if field.startswith("metadata.") else (body, field)
    if not isinstance(target, dict):
        return
    if value is DELETE:
        target.pop(key, None)
    else:
        target[key] = value


@st.composite
def fuzz_case(draw, catalog) -> tuple[str, object, str]:
    """(queue, body or raw bytes, kind): kind is "job" (usable jobId), "no-id" or "control"."""
    rnd = draw(st.randoms(use_true_random=True))   # even choices: sampled_from favours its first items
    job_type = rnd.choice([t for t in sorted(catalog.job_types) if t.startswith("sdxl")] * 3 + sorted(catalog.job_types))
    spec = catalog.job_types[job_type]
    body = payload(job_type, num_images=draw(st.integers(1, 2)))
    body["jobId"] = "<id>"
    if spec.mode == "img2img":
        body["initImage"] = GOOD_IMAGE
    body.update(draw(st.dictionaries(st.sampled_from(IGNORED), st.one_of(st.integers(-10**12, 10**12), JUNK), max_size=3)))
    body["metadata"].update(draw(st.dictionaries(st.sampled_from(IGNORED), JUNK, max_size=2)))
    queue = "sdxl_queue" if spec.worker == "image" else "wan_queue"
    kind = rnd.choice(["job"] * 12 + ["image"] * 4 + ["no-id"] * 2 + ["raw"] * 3)
    if kind == "image":   # only the input image is wrong, so the decoder is what refuses it
        body.update(jobType="sdxl_img2img", modelType="sdxl_img2img", initImage=draw(BAD_IMAGE))
        return "sdxl_queue", body, "job"
    if kind == "job":
        table = _mutations(job_type, set(spec.buckets), set(catalog.job_types))
        fields = rnd.sample(sorted(table), rnd.randint(1, 3))
        for field in sorted(fields, key=lambda f: f != "metadata"):   # replace metadata before setting inside it
            _apply(body, field, draw(table[field]))
        return queue, body, "job"
    if kind == "no-id":
        body["jobId"] = draw(st.one_of(st.sampled_from([DELETE, None, ""]), NON_STRING, TRAVERSAL, TEXT.filter(_unsafe),
                                       st.integers(129, 5000).map(lambda n: "a" * n)))
        if body["jobId"] is DELETE:
            del body["jobId"]
        return queue, body, "no-id"
    queue = rnd.choice(["sdxl_queue", "wan_queue"])
    raw = rnd.choice(["bytes", "not-object", "deep", "huge-int", "bad-utf8"])
    if raw == "bytes":
        return queue, draw(st.binary(max_size=300)), "no-id"
    if raw == "not-object":
        return queue, json.dumps(draw(st.one_of(st.lists(JUNK, max_size=3), TEXT, st.integers(), st.none()))).encode(), "no-id"
    text = json.dumps(body)
    if raw == "deep":   # a usable jobId, but nesting too deep for any JSON parser with a stack limit
        depth = draw(st.integers(1_000, 50_000))
        return queue, text[:-1].encode() + b', "nested": ' + b"[" * depth + b"]" * depth + b"}", "no-id"
    if raw == "huge-int":
        return queue, text[:-1].encode() + b', "n": ' + b"9" * draw(st.integers(4_400, 20_000)) + b"}", "no-id"
    return queue, text.replace('"prompt": "', '"prompt": "\xff\xfe', 1).encode("latin-1", "replace"), "no-id"


def generate(count: int, catalog, seed: int) -> list[Case]:
    """`count` fuzz cases from hypothesis (generation only, no shrinking), plus valid control jobs."""
    drawn: list[tuple] = []

    @hypothesis_seed(seed)
    @settings(max_examples=count, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(fuzz_case(catalog))
    def collect(case) -> None:
        drawn.append(case)

    collect()
    cases, rng = [], random.Random(seed)
    for index, (queue, body, kind) in enumerate(drawn[:count]):
        if index % CONTROL_EVERY == 0:
            control = payload(rng.choice(["sdxl_image_fast", "sdxl_img2img"]), extra=[{"junk": [None, -1]}], width=-1)
            if control["jobType"] == "sdxl_img2img":
                control["initImage"] = GOOD_IMAGE
            cases.append(Case("sdxl_queue", json.dumps(control).encode(), control["jobId"], control=True))
        if isinstance(body, dict):
            job_id = str(uuid.uuid4())
            raw = json.dumps(body).replace('"<id>"', json.dumps(job_id), 1).encode()
            cases.append(Case(queue, raw, job_id if kind == "job" else None))
        else:
            cases.append(Case(queue, body.replace(b'"<id>"', json.dumps(str(uuid.uuid4())).encode(), 1), None))
    return cases


def _stray_files(root: Path, daemon: Daemon, ids: set[str], outputs: set[str]) -> list[str]:
    """Every file under the scenario's folder that is neither the daemon's own nor an expected output."""
    own = {daemon.log_path, daemon.root / "catalog" / "job_types.yaml", root / "generator" / "job_types.yaml"}
    stray = []
    for path in root.rglob("*"):
        if path.is_dir() or path in own:
            continue
        parts = path.relative_to(daemon.data_dir).parts if path.is_relative_to(daemon.data_dir) else ("", "")
        if parts[0] in ("redis", "run"):
            continue
        if parts[0] == "jobs" and len(parts) == 2 and (parts[1] in ("callbacks.jsonl", ".lock")
                                                       or parts[1].removesuffix(".json") in ids):
            continue
        if parts[0] == "storage" and "/".join(parts[1:]) in outputs:
            continue
        stray.append(str(path.relative_to(root)))
    return stray


def fuzz(cfg: Config, root: Path, tiny) -> list[Figures]:
    fig = Figures("fuzz", cfg.name)
    root.mkdir(parents=True, exist_ok=True)
    neighbours = {p.name for p in root.parent.iterdir()}
    catalog = small_catalog(root / "generator")
    generating = time.monotonic()
    cases = generate(cfg.fuzz_payloads, catalog, cfg.seed)
    fig.notes["generated"] = f"{len(cases)} payloads in {time.monotonic() - generating:.1f} s (hypothesis)"
    daemon = Daemon(root / "daemon", tiny, steps=2).start()   # img2img needs steps × strength ≥ 1
    try:
        pids = {name: daemon.worker_pid(name) for name in ("image", "video")}
        started = time.monotonic()
        pipe = daemon.client.pipeline(transaction=False)
        for index, case in enumerate(cases, 1):
            pipe.lpush(case.queue, case.raw)
            if index % 500 == 0:
                pipe.execute()
        pipe.execute()
        ids = [c.job_id for c in cases if c.job_id]
        controls = {c.job_id for c in cases if c.control}
        no_id = {q: sum(1 for c in cases if not c.job_id and c.queue == q) for q in ("sdxl_queue", "wan_queue")}

        def dead_lettered() -> bool:
            return all(daemon.client.llen(f"{q}:dead") >= n for q, n in no_id.items())

        settle_local(fig, daemon, ids, cfg.settle_seconds, also=dead_lettered)
        fig.seconds = time.monotonic() - started
        report = _check_end_state(fig, daemon)
        tally_local(fig, daemon, ids)
        fig.submitted = len(cases)
        dead = {q: daemon.client.llen(f"{q}:dead") for q in no_id}
        fig.notes["without a jobId"] = f"{sum(no_id.values())} → dead letters {dead} (expected {no_id})"
        fig.notes["control jobs"] = f"{len(controls)} valid jobs mixed in (must complete)"
        fig.require(dead == no_id, f"dead letters {dead}, expected {no_id}")
        fig.require(fig.completed == len(controls), f"{fig.completed} completed, expected the {len(controls)} controls")
        unclear = [k for k in fig.failed if k.startswith("internal error") or "Traceback" in k or not k.strip()]
        fig.require(not unclear, f"unclear failure messages: {unclear[:5]}")
        crashes = {n: p.get("restarts") for n, p in report.get("processes", {}).items()}
        same = {n: daemon.worker_pid(n) == pid for n, pid in pids.items()}
        fig.notes["worker crashes"] = f"{sum(crashes.values() or [0])} (restarts {crashes}, same pids {same})"
        fig.require(not any(crashes.values()) and all(same.values()), f"workers crashed: {crashes} {same}")
        def counted_failed() -> float:   # the counter follows the job's end by a moment
            return sum(v for k, v in daemon.metrics().items() if k.startswith("ourvidz_jobs_total") and 'status="failed"' in k)

        eventually(lambda: counted_failed() >= fig.failed_total, timeout=5, poll=0.2)
        failed = counted_failed()
        fig.require(failed == fig.failed_total, f"/metrics counts {failed:g} failed jobs, the jobs record {fig.failed_total}")
        outputs = set()
        for job_id in controls:
            bucket, paths = daemon.client.hmget(f"job:{job_id}", "bucket", "outputs")
            outputs |= {f"{bucket.decode()}/{p}" for p in json.loads(paths or b"[]") if p.startswith(f"{USER}/{job_id}_")}
        stray = _stray_files(root, daemon, set(ids), outputs)
        fig.notes["files outside"] = f"{len(stray)} (of {sum(1 for p in (daemon.data_dir / 'storage').rglob('*') if p.is_file())} in storage)"
        fig.require(not stray, f"files outside their {{bucket}}/{{userId}}/: {stray[:5]}")
    finally:
        daemon.stop()
    new = {p.name for p in root.parent.iterdir()} - neighbours - {root.name}
    fig.require(not new, f"files written next to the scenario's folder: {sorted(new)[:5]}")
    return [fig]
