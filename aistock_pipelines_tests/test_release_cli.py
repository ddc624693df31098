"""``aistock-pipelines snapshots release | verify | history | diff | keep | prune | rollback`` on an exported
demo snapshot: what each prints, the declared retention, and verify's exit code."""

import json

import pytest

from aistock_pipelines.cli import main
from aistock_pipelines_tests.export.helpers import START, make_exporter

pytestmark = pytest.mark.db


@pytest.fixture
def cli_env(market_db, tmp_path, monkeypatch):
    """The demo market exported as snapshot ``demo``, declared in a snapshots file with
    ``release: {keep_last: 2}``: (exporter, result, path)."""
    ex = make_exporter(market_db, tmp_path)
    exported = ex, ex.export_full("demo", START), tmp_path / "demo"
    declared = tmp_path / "snapshots.yaml"
    declared.write_text("snapshots:\n  - id: demo\n    start: 2021-01-04\n    release: {keep_last: 2}\n")
    monkeypatch.setenv("AISTOCK_SNAPSHOT_ROOT", str(tmp_path))
    monkeypatch.setenv("AISTOCK_DB_URL", market_db)
    monkeypatch.setenv("AISTOCK_SNAPSHOTS_FILE", str(declared))
    monkeypatch.setenv("AISTOCK_HOME", str(tmp_path / "home"))
    return exported


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["snapshots", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_release_commands(cli_env, tmp_path, capsys):
    ex, result, path = cli_env
    end = json.loads((path / "meta.json").read_text())["end"]
    code, out, _ = _run(capsys, "release", "demo", "--json")
    first = json.loads(out)
    assert code == 0 and first["release"] == end and first["daily_pv_sha256"] == result.sha256 and first["created"]
    assert _run(capsys, "release", "demo", "--label", "study-a", "--keep")[0] == 0
    code, out, _ = _run(capsys, "release", "demo", "--label", "study-b", "--json")
    assert code == 0 and json.loads(out)["deleted_by_retention"] == [end], "keep_last 2 from the declaration"
    assert json.loads((tmp_path / "releases" / "demo" / "study-b" / "release.json").read_text())["declaration"][
        "declared"]["id"] == "demo"
    code, out, _ = _run(capsys, "verify", "demo", "study-a")
    assert code == 0 and out.startswith("OK: release study-a of demo")
    day = tmp_path / "releases" / "demo" / "study-a" / "calendars" / "day.txt"
    day.write_text(day.read_text().replace("2021-01-04", "2021-01-05", 1))
    code, _, err = _run(capsys, "verify", "demo", "study-a")
    assert code == 1 and "sha256 differs: calendars/day.txt" in err
    day.write_text(day.read_text().replace("2021-01-05", "2021-01-04", 1))
    code, out, _ = _run(capsys, "history", "demo")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["kind", "name", "range"] and len(lines) == 4
    assert [line.split()[1] for line in lines[2:]] == ["study-a", "study-b"] and "keep" in lines[2]
    code, out, _ = _run(capsys, "diff", "demo", "study-a", "live")
    assert code == 0 and "rows         " in out and "restated     0 instruments" in out
    assert _run(capsys, "keep", "demo", "study-a", "--off")[1].strip().endswith("subject to retention")
    code, out, _ = _run(capsys, "prune", "demo", "--keep-last", "1")
    assert code == 0 and out.strip() == "deleted 1 release(s) of demo: study-a"
    code, out, _ = _run(capsys, "rollback", "demo", "--to", "study-b")
    assert code == 0 and f"{result.instruments} meta rows restored" in out
    code, _, err = _run(capsys, "rollback", "demo", "--to", "study-a")
    assert code == 1 and "no release 'study-a'" in err and "study-b" in err
    code, _, err = _run(capsys, "release", "demo", "--label", "a/b")
    assert code == 1 and "not allowed" in err
