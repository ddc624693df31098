"""The demo's Dagster UI: ``dg dev`` on the workspace in a session of its own, served until the demo stops,
then its whole process group stopped."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from aistock_pipelines.settings import PACKAGE_DIR, Settings
from aistock_pipelines.step_console import StepConsole

UI_READY_TIMEOUT_S = 180
UI_STOP_TIMEOUT_S = 30


def _workspace_args() -> list[str]:
    workspace = PACKAGE_DIR.parent / "workspace.yaml"
    if workspace.exists():
        return ["-w", str(workspace)]
    return ["-m", "aistock_pipelines.definitions"]


def ui_command(port: int) -> list[str]:
    """``dg dev`` (Dagster's recommended local server) on the workspace; ``dagster dev`` where dg is not
    installed, without its notice that ``dg dev`` supersedes it. Services log warnings and errors only."""
    args = ["-h", "127.0.0.1", "-p", str(port), "--log-level", "warning", *_workspace_args()]
    dg = shutil.which("dg", path=str(Path(sys.executable).parent))
    if dg:
        return [dg, "dev", *args]
    return [sys.executable, "-W", "ignore::FutureWarning", "-m", "dagster", "dev", *args]


def serve_ui(settings: Settings, dagster_home: Path, port: int, console: StepConsole) -> int:
    """Run the UI until it exits or the demo is stopped; then stop its whole process group.

    It runs in the Dagster home (so the repository's production ``dagster.yaml`` is not in its current
    folder) and in a session of its own, so that stopping it reaches every process it started.
    """
    pid_file, log_path = settings.home / "demo.pid", dagster_home / "ui.log"
    with log_path.open("ab") as ui_log:  # the services' and their runs' own logs; the console keeps the steps
        proc = subprocess.Popen(ui_command(port), cwd=dagster_home, start_new_session=True, stdout=ui_log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    pid_file.write_text(f"{os.getpid()}\n")
    try:
        with console.step("Dagster UI") as step:
            step.progress(f"starting on http://127.0.0.1:{port}")
            wait_until_serving(proc, port, log_path)
            step.done(f"http://127.0.0.1:{port} (its log: {log_path}) — Ctrl-C or SIGTERM "
                      "(aistock-pipelines stop) stops the demo")
        return proc.wait()
    finally:
        stop_process_group(proc)
        pid_file.unlink(missing_ok=True)


def wait_until_serving(proc: subprocess.Popen, port: int, log_path: Path) -> None:
    deadline = time.monotonic() + UI_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"the Dagster UI exited with code {proc.returncode} (port {port} taken?): "
                               + " | ".join(tail))
        try:
            if httpx.get(f"http://127.0.0.1:{port}/server_info", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the Dagster UI did not answer on port {port} within {UI_READY_TIMEOUT_S} s")


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGINT to the UI (it shuts its webserver, daemon and code servers down), then SIGKILL to whatever of
    its process group is left (a run still executing, a server that hung)."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=UI_STOP_TIMEOUT_S)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    proc.wait()
