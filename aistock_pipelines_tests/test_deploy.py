"""deploy/ agrees with the code: image, module and location name, environment variables, ports, volumes,
concurrency limits. Parsed as data (pyyaml); no container engine needed."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from aistock_pipelines.settings import ENV_VARS

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
MODULE = PYPROJECT["tool"]["dagster"]["module_name"]
LOCATION = PYPROJECT["tool"]["dagster"]["code_location_name"]
IMAGE = f"aistock-pipelines:{PYPROJECT['project']['version']}"
INSTANCE = yaml.safe_load((REPO / "dagster.yaml").read_text())


def env_refs(node: object) -> set[str]:
    if isinstance(node, dict):
        own = {node["env"]} if set(node) == {"env"} else set()
        return own.union(*(env_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(env_refs(v) for v in node))
    return set()


DAGSTER_VARS = env_refs(INSTANCE) | {"DAGSTER_HOME"}
KNOWN_VARS = set(ENV_VARS) | DAGSTER_VARS


def dockerfile() -> dict[str, object]:
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(ln[4:] for ln in lines if ln.startswith("ENV "))))
    cmd = yaml.safe_load(next(ln[4:] for ln in lines if ln.startswith("CMD ")))
    return {"from": next(ln.split()[1] for ln in lines if ln.startswith("FROM ")), "env": env, "cmd": cmd,
            "expose": [ln.split()[1] for ln in lines if ln.startswith("EXPOSE ")],
            "copy": [ln.split()[1:] for ln in lines if ln.startswith("COPY ")]}


def option(args: list[str], *names: str) -> str:
    for i, arg in enumerate(args):
        if arg in names:
            return args[i + 1]
    raise AssertionError(f"none of {names} in {args}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def helm() -> dict:
    return yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())


def test_dockerfile_serves_the_code_location():
    image = dockerfile()
    assert image["from"].startswith("python:3.") and tuple(map(int, image["from"][7:].split("-")[0].split("."))) >= (3, 11)
    cmd = image["cmd"]
    assert cmd[:3] == ["dagster", "code-server", "start"]
    assert option(cmd, "-m") == MODULE and option(cmd, "--location-name") == LOCATION
    assert image["expose"] == [option(cmd, "-p")]
    assert image["env"]["AISTOCK_DEPLOYMENT"] == "production"
    assert set(image["env"]) - {"PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR"} <= KNOWN_VARS
    # the repository's instance file, unchanged, lands in DAGSTER_HOME; the workspace beside the package
    assert ["dagster.yaml", f"{image['env']['DAGSTER_HOME']}/dagster.yaml"] in image["copy"]
    assert ["deploy/workspace.yaml", "/opt/aistock_pipelines/deploy/workspace.yaml"] in image["copy"]
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    sources = [src for *srcs, _ in image["copy"] for src in srcs]
    assert sources and all(f"!{src}" in ignore or f"!{src}/**" in ignore for src in sources)


def test_workspace_names_the_code_server():
    workspace = yaml.safe_load((DEPLOY / "workspace.yaml").read_text())
    [entry] = workspace["load_from"]
    grpc = entry["grpc_server"]
    assert grpc["location_name"] == LOCATION
    assert str(grpc["port"]) == option(dockerfile()["cmd"], "-p")
    assert grpc["host"] == "code-server"


def test_compose_agrees_with_the_code(compose):
    services = compose["services"]
    assert set(services) == {"dagster-postgres", "code-server", "webserver", "daemon"}
    workspace_path = "/opt/aistock_pipelines/deploy/workspace.yaml"
    code = services["code-server"]
    assert code["command"] == dockerfile()["cmd"]
    assert {services[s]["image"] for s in ("code-server", "webserver", "daemon")} == {"${AISTOCK_IMAGE:-" + IMAGE + "}"}
    assert code["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert option(services["webserver"]["command"], "-w") == option(services["daemon"]["command"], "-w") == workspace_path
    assert services["webserver"]["command"][0] == "dagster-webserver"
    assert services["daemon"]["command"][:2] == ["dagster-daemon", "run"]
    web_port = option(services["webserver"]["command"], "-p")
    assert any(p.endswith(f":{web_port}") for p in services["webserver"]["ports"])
    assert code["expose"] == [option(code["command"], "-p")]
    for name in ("code-server", "webserver", "daemon"):  # each reaches Dagster's storage
        env = services[name]["environment"]
        assert DAGSTER_VARS <= set(env) and set(env) <= KNOWN_VARS, name
        assert env["DAGSTER_PG_HOST"] == "dagster-postgres"
    env = code["environment"]
    assert env["AISTOCK_DEPLOYMENT"] == "production" and "AISTOCK_DB_URL" in env
    pg = services["dagster-postgres"]["environment"]
    assert (pg["POSTGRES_USER"], pg["POSTGRES_DB"]) == (env["DAGSTER_PG_USERNAME"], env["DAGSTER_PG_DB"])
    assert pg["POSTGRES_PASSWORD"] == env["DAGSTER_PG_PASSWORD"]
    # the snapshot volume is mounted exactly where the code location writes snapshots
    volume, mount = code["volumes"][0].split(":")
    assert mount == env["AISTOCK_SNAPSHOT_ROOT"] and volume in compose["volumes"]
    assert set(compose["volumes"]) == {"snapshots", "dagster-pgdata"}


def test_helm_values_agree_with_the_code(helm):
    [deployment] = helm["dagster-user-deployments"]["deployments"]
    assert helm["dagster-user-deployments"]["enabled"] is True
    assert deployment["name"] == LOCATION
    assert f"{deployment['image']['repository']}:{deployment['image']['tag']}" == IMAGE
    assert option(deployment["codeServerArgs"], "-m") == MODULE
    assert str(deployment["port"]) == option(dockerfile()["cmd"], "-p")
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert set(env) <= set(ENV_VARS) and env["AISTOCK_DEPLOYMENT"] == "production"
    assert "AISTOCK_DB_URL" not in env and {"name": "aistock-db"} in deployment["envSecrets"]  # a secret
    launcher = helm["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher"
    k8s = launcher["config"]["k8sRunLauncher"]
    mounts = {m["mountPath"]: m["name"] for m in k8s["volumeMounts"]}
    assert mounts[env["AISTOCK_SNAPSHOT_ROOT"]] == "snapshots"  # run pods write where the code says
    assert k8s["volumes"] == deployment["volumes"] and k8s["volumeMounts"] == deployment["volumeMounts"]
    claim = {v["name"]: v for v in k8s["volumes"]}["snapshots"]["persistentVolumeClaim"]["claimName"]
    assert claim == "aistock-snapshots"
    assert env["AISTOCK_SNAPSHOTS_FILE"].startswith(next(m for m, n in mounts.items() if n == "snapshot-declarations"))
    assert k8s["envSecrets"] == deployment["envSecrets"]
    assert helm["postgresql"]["postgresqlScheme"] == INSTANCE["storage"]["postgres"]["postgres_db"]["scheme"]


def test_helm_concurrency_equals_dagster_yaml(helm):
    want = INSTANCE["concurrency"]
    got = helm["concurrency"]
    assert got["enabled"] is True
    assert got["runs"]["maxConcurrentRuns"] == want["runs"]["max_concurrent_runs"]
    assert got["runs"]["tagConcurrencyLimits"] == want["runs"]["tag_concurrency_limits"]
    assert (got["pools"]["defaultLimit"], got["pools"]["granularity"]) == (want["pools"]["default_limit"],
                                                                          want["pools"]["granularity"])
    assert helm["dagsterDaemon"]["runCoordinator"]["type"] == INSTANCE["run_coordinator"]["class"]
    assert helm["telemetry"] == INSTANCE["telemetry"]


def test_documented_commands_name_existing_files():
    for text in ((DEPLOY / "compose.yaml").read_text(), (DEPLOY / "Dockerfile").read_text()):
        for command in re.findall(r"#\s+((?:docker|helm) [^\n]+)", text):
            for word in shlex.split(command):
                if word.startswith("deploy/"):
                    assert (REPO / word).exists(), command
