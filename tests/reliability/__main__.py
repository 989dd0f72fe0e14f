"""python -m tests.reliability --config small|large [--only storm,redis,...] [--keep DIR]"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.reliability import CONFIGS
from tests.reliability.fallback import fallback_routing
from tests.reliability.figures import Figures
from tests.reliability.fuzz import fuzz
from tests.reliability.injected import out_of_memory, poison
from tests.reliability.outages import outages
from tests.reliability.scenarios import crash_storm, graceful_stop, redis_restart

SCENARIOS = {"storm": crash_storm, "redis": redis_restart, "outages": outages, "oom": out_of_memory,
             "poison": poison, "fuzz": fuzz, "graceful": graceful_stop, "fallback": fallback_routing}


def run(names: list[str], config: str, workdir: Path, tiny) -> list[Figures]:
    figures = []
    for name in names:
        for fig in SCENARIOS[name](CONFIGS[config], workdir / name, tiny):
            print(fig.render(), flush=True)
            figures.append(fig)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability", description=__doc__)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated, from {','.join(SCENARIOS)}")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (logs, data) afterwards")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}")
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        # A scenario's redis-server would reload the earlier run's data and count its jobs again.
        parser.error(f"--keep {args.keep} is not empty: give a new folder")
    from tools.tiny_models import build_tiny_sdxl

    workdir = args.keep or Path(tempfile.mkdtemp(prefix="reliability-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        tiny = build_tiny_sdxl(workdir / "tiny-sdxl")
        figures = run(names, args.config, workdir, tiny)
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    failed = [f.scenario for f in figures if f.problems]
    print(f"\n{len(figures)} scenario(s) in {time.monotonic() - started:.0f} s: "
          + ("all OK" if not failed else f"PROBLEMS in {', '.join(failed)}"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
