"""The product as a person uses it: the demo started as ``bin/demo`` starts it, its Dagster UI in a real
browser (Debian's Chromium driven by Playwright), then stopped — and nothing of it left running.

In the UI: the snapshot's partitions are the trading days with bars (a weekday holiday is not among them),
one partition materialized from the Materialize button succeeds with its six checks passed, the RD-Agent
assets show their metadata. Screenshots of a failing page land in ``.ci/artifacts/`` (CI keeps them).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import httpx
import psycopg
import pytest

from aistock_pipelines_tests.helpers import processes_of

pytestmark = [pytest.mark.db, pytest.mark.slow, pytest.mark.browser]
REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / ".ci" / "artifacts"
#: As root, Chromium needs --no-sandbox; the others keep it off the network this machine does not have.
CHROMIUM_ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
SNAPSHOT = "demo_allA"
DEMO_SIZE = ["--instruments", "24", "--days", "45"]  # 2021-01-04 .. early March: Spring Festival inside
HOLIDAY = "2021-02-11"  # a Thursday the exchange was closed
UI_TIMEOUT_S = 600
CHECK_NAMES = ("index_unique_sorted", "ohlc_sane", "calendar_matches_trade_calendar", "row_parity_with_database",
               "bins_match_h5", "rdagent_folders_clean")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_line(log: Path, proc: subprocess.Popen, pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        match = re.search(pattern, text)
        if match:
            return match.group(0)
        if proc.poll() is not None:
            break
        time.sleep(1)
    raise AssertionError(f"no {pattern!r} in the demo's output (exit code {proc.poll()}):\n{log.read_text()[-3000:]}")


def demo_command(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "aistock-pipelines"), "demo", "run", *args]


@pytest.fixture(scope="module")
def demo(pg_server, tmp_path_factory) -> Iterator[dict]:
    """``demo run`` on a small market in a database of its own, serving the UI on a free port."""
    root = tmp_path_factory.mktemp("ui_demo")
    port = free_port()
    env = {**os.environ, "AISTOCK_HOME": str(root / "home"), "AISTOCK_DB_URL": pg_server.create_database("ui_demo"),
           "RDAGENT_RESULTS_URL": f"http://127.0.0.1:{free_port()}"}
    env.pop("DAGSTER_HOME", None)
    log = root / "demo.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(demo_command(*DEMO_SIZE, "--port", str(port)), env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=root)
    try:
        wait_for_line(log, proc, r"==> Dagster UI: http://\S+", UI_TIMEOUT_S)
        # Dagster's one-time "Join the Dagster community" dialog would cover whatever page it pops up on
        seen = httpx.post(f"http://127.0.0.1:{port}/graphql", json={"query": "mutation { setNuxSeen }"}, timeout=60)
        assert seen.json() == {"data": {"setNuxSeen": True}}, seen.text
        yield {"url": f"http://127.0.0.1:{port}", "proc": proc, "log": log, "home": root / "home",
               "db": env["AISTOCK_DB_URL"], "env": env}
    finally:
        if proc.poll() is None:  # a test failed before stopping it: the demo's own stop, then the hard way
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, request):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(120_000)
    failed_before = request.session.testsfailed
    yield page
    if request.session.testsfailed > failed_before:  # this test's call failed: keep what the page showed
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
        (ARTIFACTS / f"{request.node.name}.html").write_text(page.content())
    page.close()


def trading_days_with_bars(db_url: str, start: str) -> list[str]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT cal_date FROM market.trading_calendar WHERE is_trading AND cal_date >= %s "
                            "AND cal_date <= (SELECT max(trade_date) FROM market.kline_daily_qfq) ORDER BY 1",
                            (date.fromisoformat(start),)).fetchall()
    return [r[0].isoformat() for r in rows]


def open_asset(page, url: str, path: str, view: str = "") -> None:
    page.goto(f"{url}/assets/{path}" + (f"?view={view}" if view else ""), wait_until="domcontentloaded")


def test_demo_console_is_quiet_and_timed(demo):
    lines = demo["log"].read_text().splitlines()
    steps = [line for line in lines if line.startswith("==> ")]
    assert len(lines) < 100 and lines == steps, lines  # nothing but step lines: no log chatter, no warning
    assert all(re.search(r"\(\d+\.\d s\)$", line) for line in steps[:-1] if " … " not in line), steps
    assert any(line.startswith(f"==> snapshot {SNAPSHOT}: full export") and "6/6 checks passed" in line
               for line in steps), steps
    assert any("RD-Agent sync" in line and "1/1 checks passed" in line for line in steps), steps


def test_partitions_are_the_trading_days_with_bars(demo, page):
    days = trading_days_with_bars(demo["db"], "2021-01-04")
    open_asset(page, demo["url"], f"snapshots/{SNAPSHOT}", "partitions")
    page.get_by_text(f"Materialized ({len(days)})").wait_for()
    page.get_by_text("Missing (0)").wait_for()
    shown = set(re.findall(r"\b20\d\d-\d\d-\d\d\b", page.inner_text("body")))
    assert shown and shown <= set(days)
    assert all(date.fromisoformat(d).weekday() < 5 for d in shown)
    page.get_by_placeholder("Filter by name").fill("2021-02-1")  # the week of the Spring Festival
    page.wait_for_timeout(1_000)
    around_holiday = set(re.findall(r"\b2021-02-1\d\b", page.inner_text("body")))
    assert HOLIDAY not in around_holiday and around_holiday == {d for d in days if d.startswith("2021-02-1")}


def test_materialize_one_partition_from_the_ui(demo, page):
    key = trading_days_with_bars(demo["db"], "2021-01-04")[-2]
    open_asset(page, demo["url"], f"snapshots/{SNAPSHOT}", "partitions")
    page.get_by_text("Materialized (").wait_for()
    page.get_by_role("button", name="Materialize").first.click()
    dialog = page.get_by_role("dialog").filter(has_text="Launch runs to materialize")
    dialog.get_by_text("Select a partition or create one").click()
    page.keyboard.type(key)
    page.get_by_role("menuitem", name=key).click()
    dialog.get_by_role("button", name="Launch 1 run").click()
    dialog.wait_for(state="hidden")

    page.goto(f"{demo['url']}/runs?q%5B0%5D=tag%3Adagster%2Fpartition%3D{key}", wait_until="domcontentloaded")
    run_link = page.locator("a[href*='/runs/']").filter(has_text=re.compile(r"^[0-9a-f]{8}$")).first
    run_link.wait_for()
    run_id = run_link.get_attribute("href").rsplit("/", 1)[-1]
    page.goto(f"{demo['url']}/runs/{run_id}", wait_until="domcontentloaded")
    deadline = time.monotonic() + UI_TIMEOUT_S
    while not page.get_by_text("Success", exact=True).count():
        assert not page.get_by_text("Failure", exact=True).count(), "the run failed"
        assert time.monotonic() < deadline, "the run did not succeed in time"
        page.wait_for_timeout(3_000)
        page.reload(wait_until="domcontentloaded")

    page.get_by_text(f"snapshot_{SNAPSHOT}_checks").first.wait_for()  # the run's steps: the asset, then its checks

    open_asset(page, demo["url"], f"snapshots/{SNAPSHOT}", "checks")
    page.get_by_text("Checks (6)").wait_for()
    page.get_by_text("Passed").first.wait_for()
    checks = page.inner_text("body")
    assert checks.count("Succeeded") == 6 and "Failed" not in checks, checks
    html = page.content()
    assert all(name in html for name in CHECK_NAMES)


def test_rdagent_assets_show_their_metadata(demo, page):
    open_asset(page, demo["url"], "rdagent/factor_catalog")
    page.get_by_text("generated_at_utc").first.wait_for()
    body = page.inner_text("body")
    for field in ("inserted", "records", "duplicates_merged", "fingerprint"):
        assert field in body, field
    assert "2026-01-14T08:30:12" in body
    open_asset(page, demo["url"], "rdagent/loop_catalog")
    page.get_by_text("records").first.wait_for()


def test_stop_leaves_nothing_running(demo):
    """``aistock-pipelines stop`` sends SIGTERM to the demo (its pid file): the UI's whole process tree goes."""
    proc, marker = demo["proc"], str(demo["home"])
    assert processes_of(marker), "the demo should be running before it is stopped"
    stop = subprocess.run([str(Path(sys.executable).parent / "aistock-pipelines"), "stop"], env=demo["env"],
                          capture_output=True, text=True, timeout=180)
    assert stop.returncode == 0, stop.stdout + stop.stderr + demo["log"].read_text()[-2000:]
    assert "demo (pid" in stop.stdout and "stopped" in stop.stdout
    assert proc.wait(timeout=60) == 0
    assert "==> stopped (SIGTERM)" in demo["log"].read_text()
    time.sleep(1)
    assert processes_of(marker) == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(demo["url"].rsplit(":", 1)[1])), timeout=2)


def test_demo_started_in_the_background_stops_on_sigint(pg_server, tmp_path):
    """A shell starts background jobs with SIGINT ignored; the demo stops on it all the same."""
    env = {**os.environ, "AISTOCK_HOME": str(tmp_path / "home"), "AISTOCK_DB_URL": pg_server.create_database("ui_int"),
           "RDAGENT_RESULTS_URL": f"http://127.0.0.1:{free_port()}"}
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(demo_command(*DEMO_SIZE, "--port", str(free_port())), env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        wait_for_line(log, proc, r"==> database: .*", 300)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "==> stopped (SIGINT)" in log.read_text()
    assert processes_of(str(tmp_path)) == []
