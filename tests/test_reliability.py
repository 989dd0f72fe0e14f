"""The reliability suite's small configuration (tests/reliability), one test per scenario, so CI
fails on any lost job, any job completed twice and each scenario's own requirement. The large
configuration runs on demand: python -m tests.reliability --config large."""
from __future__ import annotations

import pytest

from tests.reliability import CONFIGS
from tests.reliability.__main__ import SCENARIOS


@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(name, tmp_path, tiny_sdxl, capsys):
    figures = SCENARIOS[name](CONFIGS["small"], tmp_path / name, tiny_sdxl)
    with capsys.disabled():   # the figures belong in the CI log
        print("\n" + "\n".join(f.render() for f in figures))
    problems = [f"{f.scenario}: {p}" for f in figures for p in f.problems]
    assert not problems, "\n".join(problems)
