"""workers/logs.py: JSON lines carrying the process and the running job's id; plain text on a terminal."""
from __future__ import annotations

import io
import json
import logging

import pytest

from workers.logs import job_context, setup_logging


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def test_json_lines_carry_process_and_job_id():
    out = io.StringIO()                    # not a terminal: JSON by default
    setup_logging("image", env={}, stream=out)
    log = logging.getLogger("workers.runner")
    log.info("between jobs")
    with job_context("4c1e0000-0000-4000-8000-000000000001"):
        log.warning("storage unavailable: %s", "503")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed unexpectedly")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["msg"] for line in lines] == ["between jobs", "storage unavailable: 503", "failed unexpectedly"]
    assert all(line["process"] == "image" and line["logger"] == "workers.runner" for line in lines)
    assert "jobId" not in lines[0]
    assert lines[1]["jobId"] == lines[2]["jobId"] == "4c1e0000-0000-4000-8000-000000000001"
    assert lines[1]["level"] == "WARNING" and "RuntimeError: boom" in lines[2]["exc"]
    assert lines[0]["ts"].endswith("Z")


def test_text_on_a_terminal_and_on_request():
    for stream, env in ((Terminal(), {}), (io.StringIO(), {"LOG_FORMAT": "text", "LOG_LEVEL": "warning"})):
        setup_logging("video", env=env, stream=stream)
        logging.getLogger("workers.queue").info("reaped")
        with job_context("job-7"):
            logging.getLogger("workers.queue").warning("requeued")
        text = stream.getvalue()
        assert " video WARNING workers.queue: requeued [job job-7]" in text
        assert ("reaped" in text) == (env.get("LOG_LEVEL") is None)
