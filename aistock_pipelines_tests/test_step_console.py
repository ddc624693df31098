"""The quiet console: one line per step with its duration, progress lines only as heartbeats off a terminal."""

import io
import re
import time

import pytest

from aistock_pipelines.step_console import StepConsole


def test_one_line_per_step_with_duration_and_failures_named():
    out = io.StringIO()
    console = StepConsole(out, heartbeat_s=60)
    with console.step("demo market") as step:
        step.progress("seeding")
        step.done("seeded 320 instruments")
    with pytest.raises(RuntimeError), console.step("snapshot x"):
        raise RuntimeError("the database went away")
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"==> demo market: seeded 320 instruments \(\d+\.\d s\)", lines[0])
    assert re.fullmatch(r"==> snapshot x: FAILED after \d+\.\d s: the database went away", lines[1])
    assert len(lines) == 2 and "\r" not in out.getvalue()  # not a terminal: no in-place rewriting


def test_a_long_step_shows_its_progress_as_heartbeats():
    out = io.StringIO()
    console = StepConsole(out, heartbeat_s=1.0)
    with console.step("snapshot demo", poll=lambda: "reading rows: 1,234 rows") as step:
        step.progress("full export")
        time.sleep(2.6)
        step.done("full export, 6/6 checks passed")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("==> snapshot demo: full export; reading rows: 1,234 rows … ")
    assert lines[-1].startswith("==> snapshot demo: full export, 6/6 checks passed (")
    assert 2 <= len(lines) <= 4
