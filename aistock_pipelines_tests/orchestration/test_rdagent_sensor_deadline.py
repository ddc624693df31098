"""The results sensor's tick ends within its deadline, below Dagster's 60 s sensor limit, whatever the server does."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import pytest
from dagster import DagsterInstance, SensorResult, SkipReason, build_sensor_context, instance_for_test

from aistock_pipelines.orchestration.rdagent_assets import (
    SENSOR_POLL_BUDGET_S,
    SENSOR_REQUEST_DEADLINE_S,
    SENSOR_TICK_DEADLINE_S,
    catalog_asset_key,
    evaluate_results_sensor,
    rdagent_results_sensor,
)
from aistock_pipelines.rdagent.sync import LOOP_ARTIFACTS, NOT_OFFERED, NOT_PUBLISHED, POLL_KINDS
from aistock_pipelines.resources import RDAgentResultsApi
from aistock_pipelines_tests.rdagent.fixtures import Drip

ENVELOPE = {"version": "v1", "generated_at_utc": "2026-01-14T08:30:12+00:00", "source": "rdagent_tools"}
FACTORS = json.dumps({**ENVELOPE, "factors": [{"name": "f", "source": "sota"}]}).encode()
STRATEGIES = json.dumps({**ENVELOPE, "strategies": [{"strategy_id": "s1"}]}).encode()


@pytest.fixture(scope="module")
def instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as inst:
        yield inst


def test_tick_limits_stay_below_dagsters_sensor_timeout() -> None:
    assert SENSOR_REQUEST_DEADLINE_S <= SENSOR_POLL_BUDGET_S < SENSOR_TICK_DEADLINE_S < 60


def test_a_dripping_server_ends_the_tick_at_the_request_deadline(
    slow_api: Callable[..., str], instance: DagsterInstance
) -> None:
    url = slow_api({"/catalog/factors": Drip(FACTORS)})  # one byte every 2 s
    api = RDAgentResultsApi(base_url=url, read_timeout_s=5.0, request_deadline_s=3.0)
    started = time.monotonic()
    result = rdagent_results_sensor(build_sensor_context(instance=instance, resources={"rdagent_api": api}))
    elapsed = time.monotonic() - started
    assert isinstance(result, SkipReason) and "3.0 s deadline per request" in (result.skip_message or "")
    assert elapsed < 4.0, elapsed


def test_the_tick_deadline_cuts_a_slow_catalog_and_keeps_what_was_polled(slow_api: Callable[..., str]) -> None:
    url = slow_api({
        "/catalog/factors": Drip(FACTORS, pieces=4, pause=0.25),  # complete after ≈ 1 s
        "/catalog/strategies": Drip(STRATEGIES),  # one byte every 2 s: within every per-request limit
    })
    api = RDAgentResultsApi(base_url=url, read_timeout_s=5.0)
    started = time.monotonic()
    result = evaluate_results_sensor(None, api, tick_deadline_s=3.0)
    elapsed = time.monotonic() - started
    print(f"tick with a 3 s deadline ended after {elapsed:.2f} s")
    assert isinstance(result, SensorResult), result
    assert 2.9 < elapsed < 3.6, elapsed
    (request,) = result.run_requests
    assert request.asset_selection == [catalog_asset_key("factors")]
    assert set(json.loads(result.cursor)) == {"factors"}  # strategies and the rest: next tick


def test_the_tick_deadline_cuts_the_artifact_poll_and_keeps_the_catalogs_and_listings(
    slow_api: Callable[..., str]
) -> None:
    loops = json.dumps({**ENVELOPE, "loops": [{"task_run_id": "r", "loop_id": n, "workspace_id": "w"} for n in (1, 2)]})
    at_once = {"pieces": 1, "pause": 0.0}
    url = slow_api({
        "/catalog/factors": Drip(FACTORS, **at_once),
        "/catalog/loops": Drip(loops.encode(), **at_once),
        "/loops/r/1/artifacts": Drip(b'{"task_run_id": "r", "loop_id": 1, "artifacts": []}', **at_once),
        "/loops/r/2/artifacts": Drip(b'{"task_run_id": "r", "loop_id": 2, "artifacts": []}'),  # a byte every 2 s
    })
    started = time.monotonic()
    result = evaluate_results_sensor(None, RDAgentResultsApi(base_url=url, read_timeout_s=5.0), tick_deadline_s=3.0)
    elapsed = time.monotonic() - started
    print(f"tick cut in the artifact poll after {elapsed:.2f} s")
    assert isinstance(result, SensorResult), result
    assert 2.9 < elapsed < 3.6, elapsed
    cursor = json.loads(result.cursor)
    assert set(cursor) == set(POLL_KINDS) - {LOOP_ARTIFACTS}  # the artifacts' fingerprint: next tick
    assert cursor["task_runs"] == NOT_OFFERED and cursor["models"] == NOT_PUBLISHED
    (request,) = result.run_requests
    assert catalog_asset_key("loops") in request.asset_selection  # its artifacts are synced with it
