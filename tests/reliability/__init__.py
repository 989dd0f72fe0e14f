"""The reliability suite (issue 7): the real daemon under faults, with figures.

    .venv/bin/python -m tests.reliability --config small         # what CI runs (tests/test_reliability.py)
    .venv/bin/python -m tests.reliability --config large         # on demand: 1,000 jobs / 100 kills, 10,000 fuzz payloads
    .venv/bin/python -m tests.reliability --only storm,fuzz      # some scenarios

Every scenario starts `dual_orchestrator.py run` (embedded redis-server with AOF, supervised
image and video workers, tiny random-weight SDXL on CPU, a shrunk catalog), pushes CONTRACT.md
payloads the way queue-job does, injects its fault, waits until every job is settled and prints:
submitted, completed, failed with reason, lost, completed twice, time taken. A scenario fails on
any lost job, any job completed twice and any scenario-specific requirement (listed in `problems`).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    name: str
    storm_jobs: int          # crash storm: jobs, spread over about storm_seconds
    storm_kills: int         # kill -9s of random workers during the storm
    storm_seconds: float
    restart_jobs: int        # Redis restart: jobs around two restarts (SIGTERM, then SIGKILL)
    outage_jobs: int         # storage outage and callback outage: jobs in each
    outage_seconds: float    # each phase (503s, then hangs) lasts this long
    poison_jobs: int         # payloads that crash the worker process every time
    fuzz_payloads: int
    fallback_jobs: int       # fallback routing: sdxl jobs per part (plus one sdxl_img2img)
    settle_seconds: float    # how long a scenario waits for its jobs before counting the rest lost
    seed: int = 7


CONFIGS = {
    "small": Config("small", storm_jobs=120, storm_kills=6, storm_seconds=16, restart_jobs=40, outage_jobs=12,
                    outage_seconds=3, poison_jobs=1, fuzz_payloads=300, fallback_jobs=3, settle_seconds=150),
    "large": Config("large", storm_jobs=1000, storm_kills=100, storm_seconds=420, restart_jobs=300, outage_jobs=100,
                    outage_seconds=10, poison_jobs=2, fuzz_payloads=10000, fallback_jobs=30,
                    settle_seconds=900),
}
