"""The demo syncs only from a results API serving the demo catalogs; anything else on the port is left alone."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

from aistock_pipelines.demo.rdagent_results_builder import load_demo_catalog
from aistock_pipelines.demo_run import demo_api_problem, ensure_results_api
from aistock_pipelines.rdagent.results_client import RDAgentResultsClient
from aistock_pipelines.settings import Settings

DEMO_FACTORS = load_demo_catalog("factor_catalog.json")


def settings_for(url: str, home: Path) -> Settings:
    return Settings.from_env({"RDAGENT_RESULTS_URL": url, "AISTOCK_HOME": str(home)})


def served_factor_names(url: str) -> list[str]:
    with RDAgentResultsClient(url, retries=0) as client:
        return [r["name"] for r in client.fetch_catalog("factors").records]


def test_another_service_answering_health_is_not_synced_from(fake_api: Callable[..., Any], tmp_path: Path) -> None:
    imposter = fake_api({"/health": {"status": "ok"},
                         "/catalog/factors": {**DEMO_FACTORS, "factors": [{"name": "evil", "source": "sota"}]}})
    health_only = fake_api({"/health": {"status": "ok"}})
    assert demo_api_problem(imposter.base_url) == "it answers /health, but its factors catalog is not the demo's"
    assert demo_api_problem(health_only.base_url) == "it answers /health, but its factors catalog is not the demo's"
    for other in (imposter, health_only):
        with ExitStack() as stack:
            url = ensure_results_api(settings_for(other.base_url, tmp_path), stack)
            assert url != other.base_url  # the port is taken: the demo's own API on a port of its own
            assert served_factor_names(url) == [f["name"] for f in DEMO_FACTORS["factors"]]
    assert "/catalog/loops" not in imposter.paths  # refused at the first catalog that differs


def test_the_demo_results_api_already_running_is_reused(demo_server: str, tmp_path: Path) -> None:
    assert demo_api_problem(demo_server) is None
    with ExitStack() as stack:
        assert ensure_results_api(settings_for(demo_server, tmp_path), stack) == demo_server


def test_a_free_configured_port_gets_the_demo_api(closed_port_url: str, tmp_path: Path) -> None:
    assert demo_api_problem(closed_port_url) == "no results API answers there"
    with ExitStack() as stack:
        assert ensure_results_api(settings_for(closed_port_url, tmp_path), stack) == closed_port_url
        assert demo_api_problem(closed_port_url) is None
