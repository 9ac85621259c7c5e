"""Every hostile input of ``hostile_inputs.py`` through the real script: one ``error:`` line, the right exit code,
no traceback, within 30 s and 1.5 GiB (the issue's bound for a small file)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile_inputs import CASES, check_result, run_case

MAX_SECONDS = 30
MAX_RSS = int(1.5 * 2**30)


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_refused_quickly_and_cheaply(tmp_path: Path, name: str) -> None:
    command = CASES[name](tmp_path)
    result = run_case(command, tmp_path, timeout=2 * MAX_SECONDS)
    assert not check_result(name, command, result)
    assert result.seconds < MAX_SECONDS, f"{name} took {result.seconds:.1f} s"
    assert 0 < result.peak_rss < MAX_RSS, f"{name} peaked at {result.peak_rss / 2**20:.0f} MiB"
