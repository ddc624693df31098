"""Secrets never shown: with a password in AISTOCK_DB_URL, the local deployment's code location, loaded out of
process as the webserver loads it, answers GraphQL (resources, launchpad defaults, a failing run's event log)
without it, and neither the CLI's output nor its errors show it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import instance_for_test
from dagster._core.test_utils import wait_for_runs_to_finish
from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql

from aistock_pipelines.resources import resources_for, secret_aware
from aistock_pipelines.settings import Settings, SettingsError

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "Zq7-n0t-f0r-y0ur-eyes"
SELECTOR = {"repositoryLocationName": "aistock_pipelines", "repositoryName": "__repository__"}

RESOURCES = """
query($selector: RepositorySelector!) {
  repositoryOrError(repositorySelector: $selector) {
    __typename
    ... on Repository { allTopLevelResourceDetails { name configuredValues { key value type } } }
  }
}"""
DEFAULTS = """
query($selector: PipelineSelector!) {
  runConfigSchemaOrError(selector: $selector) { __typename ... on RunConfigSchema { rootDefaultYaml } }
}"""
LAUNCH = """
mutation($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
  }
}"""
LOGS = """
query($runId: ID!) {
  runOrError(runId: $runId) { __typename ... on Run { status runConfigYaml } }
  logsForRun(runId: $runId) {
    __typename
    ... on EventConnection { events {
      __typename
      ... on MessageEvent { message }
      ... on ExecutionStepFailureEvent { error { message stack causes { message stack } } }
      ... on RunFailureEvent { error { message } }
    } }
  }
}"""


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """The local deployment with a password-carrying database URL (nobody listens there)."""
    url = f"postgresql://aistock:{PASSWORD}@127.0.0.1:{_closed_port()}/aistock"
    for name, value in {"AISTOCK_DEPLOYMENT": "local", "AISTOCK_DB_URL": url, "AISTOCK_HOME": str(tmp_path / "home"),
                        "AISTOCK_SNAPSHOT_ROOT": str(tmp_path / "snapshots"),
                        "RDAGENT_RESULTS_URL": f"http://127.0.0.1:{_closed_port()}"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AISTOCK_SNAPSHOTS_FILE", raising=False)
    yield url


def test_graphql_answers_and_event_logs_never_show_the_password(secret_env: str) -> None:
    # The default coordinator launches at once (the queued one waits for a daemon), as `dagster dev` would.
    immediate = {"run_coordinator": {"module": "dagster._core.run_coordinator", "class": "DefaultRunCoordinator"}}
    with instance_for_test(overrides=immediate) as instance, \
            define_out_of_process_context(str(REPO / "workspace.yaml"), None, instance) as context:
        resources = execute_dagster_graphql(context, RESOURCES, {"selector": SELECTOR}).data
        details = {r["name"]: r for r in resources["repositoryOrError"]["allTopLevelResourceDetails"]}
        assert {"key": "url", "value": "AISTOCK_DB_URL", "type": "ENV_VAR"} in details["aistock_db"]["configuredValues"]
        job = {**SELECTOR, "pipelineName": "snapshot_demo_qlib_job"}
        defaults = execute_dagster_graphql(context, DEFAULTS, {"selector": job}).data
        assert defaults["runConfigSchemaOrError"]["__typename"] == "RunConfigSchema"
        launched = execute_dagster_graphql(context, LAUNCH, {"params": {
            "selector": job, "runConfigData": {},
            "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "2024-06-19"}]}}}).data
        run_id = launched["launchPipelineExecution"]["run"]["runId"]
        wait_for_runs_to_finish(instance, timeout=180)
        logs = execute_dagster_graphql(context, LOGS, {"runId": run_id}).data
        stored = "\n".join(str(record) for record in instance.all_logs(run_id))
    assert logs["runOrError"]["status"] == "FAILURE"  # the database is unreachable: the step fails
    failures = [e for e in logs["logsForRun"]["events"] if e["__typename"] == "ExecutionStepFailureEvent"]
    assert failures and "OperationalError" in failures[0]["error"]["message"]
    answers = json.dumps([resources, defaults, launched, logs])
    assert PASSWORD not in answers and PASSWORD not in stored


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("aistock-pipelines", path=str(Path(sys.executable).parent)) or "aistock-pipelines"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300, env=dict(os.environ))


def test_cli_output_and_errors_never_show_the_password(secret_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    shown = _cli("settings")
    assert shown.returncode == 0 and "aistock:***@127.0.0.1" in shown.stdout
    unreachable = _cli("rdagent", "sync", "factors")  # the API first, then the database: both refused
    assert unreachable.returncode == 1 and "factors: FAILED" in unreachable.stderr
    monkeypatch.setenv("AISTOCK_DB_URL", secret_env.replace("@127.0.0.1:", "@127.0.0.1:port"))
    malformed = _cli("db", "url")
    assert malformed.returncode == 2 and "AISTOCK_DB_URL postgresql://aistock:***@127.0.0.1:port" in malformed.stderr
    for out in (shown, unreachable, malformed):
        assert PASSWORD not in out.stdout + out.stderr


def test_a_password_not_from_the_environment_is_refused(secret_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert secret_aware("AISTOCK_DB_URL", "postgresql://aistock@db/aistock") == "postgresql://aistock@db/aistock"
    monkeypatch.delenv("AISTOCK_DB_URL")
    with pytest.raises(SettingsError, match=r"aistock:\*\*\*@db.*set it in the environment") as raised:
        resources_for(Settings.from_env({"AISTOCK_DB_URL": f"postgresql://aistock:{PASSWORD}@db/aistock"}))
    assert PASSWORD not in str(raised.value)
