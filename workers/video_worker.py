"""Video worker process on wan_queue (and the deprecated job_queue, drained into it).

The Wan pipelines are not part of this build yet. Until they are, this worker still claims every
wan_queue job and fails it with a clear message, so no job waits forever or disappears.
Run by the orchestrator: python -m workers.video_worker
"""
from __future__ import annotations

import sys

from workers.config import Catalog, Settings
from workers.worker_process import run_worker

NOT_INSTALLED = "Wan video generation is not installed on this pod yet; use an sdxl_* job type for images"


def load_models(catalog: Catalog, settings: Settings, model_keys: list[str]) -> tuple[dict, dict[str, str]]:
    return {}, {key: NOT_INSTALLED for key in model_keys}


if __name__ == "__main__":
    sys.exit(run_worker("video", load_models))
