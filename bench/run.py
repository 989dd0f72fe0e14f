"""The benchmark: plain diffusers next to this project, in one process run (README "Performance").

    python3 -m bench.run --json OUT.json                 # on the GPU machine: every part that fits --budget
    python3 -m bench.run --json OUT.json --parts queue   # CPU only: pickup latency and per-job overhead
    python3 -m bench.run --json OUT.json --tiny          # smoke run of the same code on tiny models (CPU is fine)

Parts, in order (each skipped when the time left is under its estimate, each failure reported and
the next part run): build (real-size random-weight SDXL saved as a diffusers folder), plain, refs
(fp32 and bf16 plain references for the numerics), stages (attribution of each lever on
sdxl_image_fast), project (the production path: job_types.yaml's optimize block), wan (plain
WanPipeline, the project's WanFamily eager and with its default regional compile), cold (a fresh
process: ready / first job with the warm compile cache), alt (the other compile mode, batch 1 only),
coldalt (a fresh process in that mode, warm cache), resident (each worker in a fresh process), preloaded
(each worker forked from the preloaded server, as the daemon restarts it), saturated (the image
worker process fed a queue of jobs through redis-server: seconds per job and the card's busy share), together
(both workers starting at once on the card: their peak memory together), images
(Qwen-Image 2512 quality and Lightning fast, Qwen-Image-Edit 2511 edit and inpaint, Z-Image-Turbo, and
swap times between them under a VRAM budget), queue (CPU part). Prints a table last and writes the JSON file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.common import Report  # noqa: E402
from bench.saturated import run_saturated  # noqa: E402

ESTIMATES = {"build": 30, "plain": 60, "refs": 30, "stages": 60, "project": 150, "wan": 400, "cold": 90,
             "alt": 150, "coldalt": 90, "resident": 120, "preloaded": 100, "saturated": 100, "together": 150, "images": 300, "queue": 10}
GPU_PARTS = ("build", "plain", "refs", "stages", "project", "wan", "cold", "alt", "coldalt", "resident", "preloaded", "saturated", "images", "together")


def versions() -> dict:
    import diffusers
    import transformers

    meta = {"torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name(0)
        meta["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return meta


def section(report: Report, parts: set, name: str, fn, state: dict) -> None:
    if name not in parts:
        return
    if report.left() < ESTIMATES[name]:
        report.note(f"part {name} skipped: {report.left():.0f}s left, it needs about {ESTIMATES[name]}s")
        return
    report.say(f"=== {name}")
    t0 = time.perf_counter()
    try:
        fn(state)
    except Exception as exc:  # noqa: BLE001 — report it, run the next part
        traceback.print_exc()
        report.note(f"part {name} failed: {type(exc).__name__}: {str(exc)[:300]}")
    finally:
        from bench.sdxl_bench import cleanup

        cleanup()
        report.meta.setdefault("part_seconds", {})[name] = round(time.perf_counter() - t0, 1)


def run_cold(report: Report, state: dict, compile_mode: str | None = None) -> None:
    """A fresh process after the in-process part filled the compile cache: the warm-cache restart.
    compile_mode None: the catalog's optimize block; else that mode, warmed at batch 1 only (as alt)."""
    data = state["work"] / "data"
    cmd = [sys.executable, "-m", "bench.cold_start", "--t0", "", "--model", str(state["folder"]), "--data-dir", str(data)]
    if compile_mode:
        cmd += ["--compile", compile_mode, "--batches", "1", "--size", str(state["size"])]
    if state["tiny"]:
        cmd += ["--job-types", str(state["catalog_file"])]
    t0 = time.time()
    cmd[cmd.index("--t0") + 1] = repr(t0)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(60, report.left() - 20))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("COLD ")), None)
    if line is None:
        raise RuntimeError(f"cold start child failed (rc {proc.returncode}): {proc.stderr[-1500:]}")
    result = json.loads(line[5:])
    variant = state["project_variant"] if compile_mode is None else state["alt_variant"]
    report.meta.setdefault("cold_start_warm_cache", {})[variant] = result
    in_process = report.meta.get("project_load", {}).get(variant, {})
    report.row("sdxl time to ready (warm compile cache)", f"fresh process, {variant}", [result["ready"]],
               first_job_done_s=result["first_job_done"], imports_s=result["imports"],
               accelerated_s=result.get("accelerated"),
               longest_stage_s=result.get("longest_stage_s"))
    if in_process:
        report.row("sdxl load + compile + warm-up (cold cache)", f"in process, {variant}", [in_process["load_and_warmup_s"]],
                   note="after imports; compile cache empty")


def child_command(state: dict, family: str, model: Path) -> list[str]:
    cmd = [sys.executable, "-m", "bench.cold_start", "--family", family, "--all-jobs", "--model", str(model),
           "--data-dir", str(state["work"] / "data"), "--t0", repr(time.time())]
    if state["tiny"]:
        cmd += ["--job-types", str(state["catalog_file"])]
    return cmd


def child_result(family: str, returncode: int, stdout: str, stderr: str) -> dict:
    line = next((ln for ln in stdout.splitlines() if ln.startswith("COLD ")), None)
    if line is None:
        raise RuntimeError(f"{family} child failed (rc {returncode}): {stderr[-1500:]}")
    return json.loads(line[5:])


def cold_child(report: Report, state: dict, family: str, model: Path) -> dict:
    proc = subprocess.run(child_command(state, family, model), cwd=REPO, capture_output=True, text=True,
                          timeout=max(60, report.left() - 20))
    return child_result(family, proc.returncode, proc.stdout, proc.stderr)


def wan_folder(state: dict) -> Path:
    from bench.wan_bench import build_real_wan, build_tiny_wan

    wan = state["work"] / "wan"
    if not (wan / "model_index.json").exists():
        build_tiny_wan(wan) if state["tiny"] else build_real_wan(wan, state["device"])
    return wan


def run_preloaded(report: Report, state: dict) -> None:
    """Restarts as the daemon makes them (workers/preload.py): each worker forked from a server that
    imported the stack before, with the compile cache as earlier parts left it. Compare with the
    `cold` and `resident` rows, whose fresh interpreters import everything first."""
    import os

    from workers.preload import PreloadedSpawner

    module = "bench.cold_start"
    spawner = PreloadedSpawner(forkable=lambda argv: module if argv[1:3] == ["-m", module] else None)
    report.meta["preload_server_imports_s"] = round(spawner.warm(), 2)   # once, as at the daemon's start
    # SDXL twice: as job_types.yaml configures it, then compile=none (CUDA graphs of the eager UNet):
    # what a restart costs without any torch.compile.
    runs = [("sdxl", state["folder"], []), ("sdxl", state["folder"], ["--compile", "none"]), ("wan", None, [])]
    for family, model, extra in runs:
        if family not in state["resident"]:
            continue
        out = state["work"] / f"preloaded-{family}.json"
        out.unlink(missing_ok=True)
        cmd = child_command(state, family, model or wan_folder(state)) + extra + ["--out", str(out)]
        cmd[cmd.index("--t0") + 1] = repr(time.time())
        code = spawner(cmd, dict(os.environ)).wait(timeout=max(60, report.left() - 20))
        if code != 0 or not out.exists():
            raise RuntimeError(f"preloaded {family} child failed (exit {code})")
        r = json.loads(out.read_text())
        name = family + (" compile=none" if extra else "")
        report.meta.setdefault("preloaded", {})[name] = r
        report.row(f"{family} time to ready (preloaded fork)",
                   "forked from the preloaded server" + (", compile=none + CUDA graphs" if extra else ", cache as left"),
                   [r["ready"]], first_job_done_s=r["first_job_done"], imports_s=r["imports"], accelerated_s=r.get("accelerated"),
                   longest_stage_s=r.get("longest_stage_s"),
                   preimported=r["preimported"], peak_reserved_gib=round(r.get("peak_reserved_gib", 0.0), 2),
                   **{k: round(v, 2) for k, v in r.items() if k.endswith("_job_s")})


def gpu_used_by(pids: set[int]) -> float:
    """GiB the card gives these processes (nvidia-smi: the CUDA context and everything PyTorch reserved)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0.0
    rows = [line.split(",") for line in out.strip().splitlines() if "," in line]
    return sum(float(mib) for pid, mib in rows if pid.strip().isdigit() and int(pid) in pids) / 1024


def run_together(report: Report, state: dict) -> None:
    """Both workers on the card at once, as a pod starts them: SDXL (its 1-image and 6-image jobs)
    and Wan (video_fast, image_fast) each in a fresh process with the compile cache as it is. The
    row: the most the card held for the two together (nvidia-smi, sampled every 0.25 s)."""
    families = {"sdxl": state["folder"], "wan": wan_folder(state)}
    procs = {f: subprocess.Popen(child_command(state, f, m), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for f, m in families.items()}
    pids, peak, deadline = {p.pid for p in procs.values()}, 0.0, time.time() + max(60, report.left() - 20)
    while any(p.poll() is None for p in procs.values()) and time.time() < deadline:
        peak = max(peak, gpu_used_by(pids))
        time.sleep(0.25)
    results = {}
    for family, proc in procs.items():
        if proc.poll() is None:
            proc.kill()
        stdout, stderr = proc.communicate()
        results[family] = child_result(family, proc.returncode, stdout, stderr)
    report.meta["together"] = results
    report.row("both workers on one card", "concurrent fresh processes (nvidia-smi peak of the two)", None,
               card_peak_gib=round(peak, 2), **{f"{f}_peak_reserved_gib": round(r.get("peak_reserved_gib", 0.0), 2)
                                                for f, r in results.items()},
               **{f"{f}_ready_s": r["ready"] for f, r in results.items()})


def run_resident(report: Report, state: dict) -> None:
    """Each worker in its own fresh process, as in production: first on an empty compile cache, then
    again on the cache the first filled. Rows: time to ready, first job, each process's peak GPU memory
    (PyTorch reserved); the card holds both processes, so their sum (+ ~0.5 GiB CUDA context each) is
    the peak with both workers resident."""
    wan = wan_folder(state)
    families = [(f, m) for f, m in (("sdxl", state["folder"]), ("wan", wan)) if f in state["resident"]]
    for cache in ("cold", "warm"):
        peaks = 0.0
        for family, model in families:
            if report.left() < 60:
                report.note(f"resident: {family} {cache} skipped, {report.left():.0f}s left")
                return
            r = cold_child(report, state, family, model)
            report.meta.setdefault("resident", {})[f"{family} {cache}"] = r
            peaks += r.get("peak_reserved_gib", 0.0)
            jobs = {k: round(v, 2) for k, v in r.items() if k.endswith("_job_s")}
            report.row(f"{family} time to ready ({cache} compile cache)", "fresh process, job_types.yaml optimize",
                       [r["ready"]], first_job_done_s=r["first_job_done"], imports_s=r["imports"], accelerated_s=r.get("accelerated"),
                   longest_stage_s=r.get("longest_stage_s"),
                       peak_alloc_gib=round(r.get("peak_alloc_gib", 0.0), 2),
                       peak_reserved_gib=round(r.get("peak_reserved_gib", 0.0), 2), **jobs)
        if len(families) < 2:
            continue
        report.row(f"both workers resident ({cache})", "sum of the two processes' peak reserved", None,
                   peak_reserved_gib=round(peaks, 2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--budget", type=float, default=560, help="seconds this run may take (parts that do not fit are skipped)")
    ap.add_argument("--parts", default=None, help=f"comma-separated, default: {','.join(GPU_PARTS)} on a GPU, queue on a CPU")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per job after one warm-up")
    ap.add_argument("--tiny", action="store_true", help="tiny random models and 64x64 jobs: a smoke run")
    ap.add_argument("--resident", default="sdxl,wan", help="families the resident part starts (fresh processes)")
    ap.add_argument("--images", default="z_image,qwen_t2i,swaps,qwen_edit",
                    help="steps of the images part, in order (swaps: between the models built before it)")
    ap.add_argument("--alt-compile", default=None, choices=("none", "blocks", "unet"),
                    help="SDXL compile mode of the alt/coldalt parts (default: the one job_types.yaml does not use)")
    ap.add_argument("--wan-quick", action="store_true",
                    help="wan part: video_fast and video_fast_cached only, for a short device lease")
    ap.add_argument("--work-dir", default=None, help="models, storage and compile cache (default: a new temp dir)")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("workers").setLevel(logging.INFO)   # model loads, moves and swaps, with their times
    report = Report(budget_s=args.budget)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parts = set((args.parts or (",".join(GPU_PARTS) if device == "cuda" else "queue")).split(","))
    report.meta.update(versions(), device=device, tiny=args.tiny, parts=sorted(parts), argv=sys.argv[1:])
    report.say("versions", json.dumps(report.meta))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-"))
    work.mkdir(parents=True, exist_ok=True)
    state = {"work": work, "folder": work / "sdxl", "tiny": args.tiny, "device": device,
             "resident": args.resident.split(",")}

    if parts & set(GPU_PARTS):
        from bench import sdxl_bench as S
        from storage.local import LocalStorage
        from workers.config import Settings, load_catalog
        from workers.pipelines.sdxl import SDXLFamily

        if args.tiny:
            from tools.small_catalog import write_small_job_types

            state["catalog_file"] = write_small_job_types(work / "catalog", width=64, height=64, steps=2, frames=5)
        catalog = load_catalog(state.get("catalog_file"))
        jobs = [S.make_job(catalog, t, n) for t, n in S.JOBS]
        fast = jobs[0]
        size = (fast.width, fast.height)
        state["size"] = fast.width
        state.update(catalog=catalog, jobs=jobs, plain={}, fp32=None, flops=None, storage=LocalStorage(work / "storage"))
        # The production configuration: the catalog's optimize block, as the image worker reads it.
        project_accel = SDXLFamily.acceleration_for(catalog, fast.spec.model, Settings.from_env({"DATA_DIR": str(work / "data")}))
        state["project_variant"] = f"project default: compile={project_accel.compile} + CUDA graphs"
        other = args.alt_compile or ("blocks" if project_accel.compile == "unet" else "unet")
        state["alt_variant"] = f"project: compile={other} + CUDA graphs"

        def build(st):
            if (st["folder"] / "model_index.json").exists():
                report.say("model folder already there")
            elif args.tiny:
                S.build_tiny_sdxl(st["folder"])
            else:
                S.build_real_sdxl(st["folder"], device)

        def plain(st):
            st["plain"], st["flops"], st["plain_probe"] = S.run_plain(report, st["folder"], jobs, device, args.runs)

        def refs(st):
            st["fp32"] = S.run_references(report, st["folder"], fast, device, st["plain"], st["plain_probe"])

        def stages(st):
            S.run_project_stages(report, st["folder"], fast, device, st["storage"], st["plain"], st["fp32"],
                                 st["flops"], args.runs)

        def project(st):
            S.run_project(report, st["folder"], jobs, device, st["storage"], st["plain"], st["fp32"], st["flops"],
                          args.runs, project_accel, st["project_variant"], check_job=S.label(fast.job_type, 1))

        def wan(st):
            from bench.wan_bench import run_wan

            run_wan(report, catalog, work, device, st["storage"], runs=args.runs, tiny=args.tiny, quick=args.wan_quick)

        def alt(st):
            accel = dataclasses.replace(project_accel, compile=other, warmup=((1, *size),))
            S.run_project(report, st["folder"], jobs[:2], device, st["storage"], st["plain"], st["fp32"], st["flops"],
                          args.runs, accel, st["alt_variant"], check_job=S.label(fast.job_type, 1))

        def images(st):
            from bench.image_bench import run_images

            run_images(report, catalog, work, device, st["storage"], runs=args.runs, tiny=args.tiny,
                       which=tuple(args.images.split(",")))

        if device == "cpu":
            parts -= {"stages"}  # CUDA graphs need a GPU
        for name, fn in (("build", build), ("plain", plain), ("refs", refs), ("stages", stages), ("project", project),
                         ("wan", wan), ("cold", lambda st: run_cold(report, st)), ("alt", alt),
                         ("coldalt", lambda st: run_cold(report, st, other)),
                         ("resident", lambda st: run_resident(report, st)),
                         ("preloaded", lambda st: run_preloaded(report, st)),
                         ("saturated", lambda st: run_saturated(report, st)),
                         ("images", images), ("together", lambda st: run_together(report, st))):
            section(report, parts, name, fn, state)

    if "queue" in parts:
        def queue(st):
            from bench.queue_bench import run_queue

            run_queue(report, work / "queue")

        ESTIMATES["queue"] = 0  # CPU only: not limited by the device budget
        section(report, parts, "queue", queue, state)

    report.finish()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": report.meta, "rows": report.rows, "notes": report.notes}, indent=1,
                                          default=str))
    m = report.meta
    print(f"\nRESULTS  {m.get('gpu', 'CPU')}  torch {m['torch']} (CUDA {m['cuda']})  diffusers {m['diffusers']}  "
          f"transformers {m['transformers']}  total {report.elapsed():.0f}s")
    print(report.table())
    for n in report.notes:
        print("NOTE", n)
    print(f"JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
