"""workers/faults.py: off by default, refused against a real Supabase project, and what it injects."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.worker_harness import REPO
from workers import faults
from workers.config import ConfigError


@pytest.fixture(autouse=True)
def restore():
    yield
    faults.configure({})


def test_off_by_default_and_markers_are_then_ignored():
    assert faults.configure({}) is False and not faults.enabled()
    faults.during_generation({"faultInjection": "oom"})       # nothing happens
    assert faults.configure({"FAULT_INJECTION": "0"}) is False


def test_oom_marker_raises_what_torch_raises():
    assert faults.configure({"FAULT_INJECTION": "1", "SUPABASE_URL": "http://127.0.0.1:54321"}) is True
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        faults.during_generation({"metadata": {"faultInjection": "oom"}})
    faults.during_generation({"faultInjection": "something else"})
    faults.during_generation(["not", "a", "payload"])


@pytest.mark.parametrize("env", [
    {"FAULT_INJECTION": "maybe"},
    {"FAULT_INJECTION": "1", "SUPABASE_URL": "https://abcd.supabase.co"},
])
def test_refused(env):
    with pytest.raises(ConfigError):
        faults.configure(env)
    assert not faults.enabled()


def test_a_real_project_needs_the_explicit_allowance():
    env = {"FAULT_INJECTION": "1", "SUPABASE_URL": "https://abcd.supabase.co", "FAULT_INJECTION_ALLOW_REMOTE": "1"}
    assert faults.configure(env) is True


def test_crash_marker_kills_the_process():
    code = ("from workers import faults; faults.configure({'FAULT_INJECTION': '1'}); "
            "faults.during_generation({'faultInjection': 'crash'}); print('survived')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == -9 and "survived" not in result.stdout
