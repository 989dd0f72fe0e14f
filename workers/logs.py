"""Logging for every process of the daemon: JSON lines for machines, plain lines for a terminal.

    {"ts": "2026-12-01T21:40:02.113Z", "level": "INFO", "process": "image", "logger": "workers.runner",
     "jobId": "4c1e...", "msg": "job 4c1e... completed: 2 output(s) in 0.91s"}

LOG_FORMAT=json (the default when stdout is not a terminal: RunPod's log view, files, collectors),
text (the default on a terminal), or auto. `jobId` is present while a job runs in that thread: the
runner wraps each job in `job_context`. LOG_LEVEL sets the level (INFO).
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
import time

_current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)


@contextlib.contextmanager
def job_context(job_id: str | None):
    """Every log record made inside carries this jobId."""
    token = _current_job.set(job_id)
    try:
        yield
    finally:
        _current_job.reset(token)


class _JobIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = _current_job.get()
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str):
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname, "process": self.process, "logger": record.name}
        if getattr(record, "job_id", None):
            entry["jobId"] = record.job_id
        entry["msg"] = record.getMessage()
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self, process: str):
        super().__init__(f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        job_id = getattr(record, "job_id", None)
        return f"{line} [job {job_id}]" if job_id and job_id not in record.getMessage() else line


def setup_logging(process: str, env=None, stream=None) -> None:
    """Configure the root logger of this process (`process`: orchestrator, image, video, gateway)."""
    env = os.environ if env is None else env
    stream = stream or sys.stdout
    kind = (env.get("LOG_FORMAT") or "auto").lower()
    if kind not in ("auto", "json", "text"):
        kind = "auto"
    if kind == "auto":
        kind = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(process) if kind == "json" else TextFormatter(process))
    handler.addFilter(_JobIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    level = (env.get("LOG_LEVEL") or "INFO").upper()
    root.setLevel(level if level in logging.getLevelNamesMapping() else "INFO")
