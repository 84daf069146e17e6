"""Package boundaries: what each part of diffq may import (issue 23).

Each check imports a part in a fresh interpreter and reads ``sys.modules``: an import is
refused there whether it is written at the top of a module or reached through another one.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from redis import Redis

import diffq.app.contract
from diffq.app.contract.records import ModelRecord
from diffq.app.contract.tasks import queue_name
from diffq.app.embedded_redis import EmbeddedRedis
from diffq.app.settings import Settings
from tests.helpers import wait_for, work
from tests.services import Services, services

if TYPE_CHECKING:
    from diffq.model.engine import Engine

REPO = Path(__file__).resolve().parent.parent

# Importing the contract must not bring in the API's modules (the worker and the deliverer import it),
# nor the model stack.
CONTRACT_FORBIDDEN = (
    "diffq.app.api", "diffq.app.auth", "diffq.app.core", "diffq.app.settings", "diffq.app.main", "diffq.app.deps", "diffq.app.webhooks", "diffq.app.storage",
    "diffq.app.schemas", "fastapi", "starlette", "pydantic_settings", "torch", "diffusers", "transformers",
)


def _imported(statements: str) -> list[str]:
    """The modules in ``sys.modules`` after running ``statements`` in a fresh interpreter."""
    script = textwrap.dedent(statements) + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def _offending(modules: list[str], forbidden: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == f or m.startswith(f + ".") for f in forbidden)]


def contract_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(diffq.app.contract.__path__, "diffq.app.contract."))


def test_every_contract_module_is_listed() -> None:
    # The webhook queue and outbox are part of the contract (the job scripts write them).
    expected = {"diffq.app.contract.webhook_queue", "diffq.app.contract.webhook_outbox", "diffq.app.contract.store"}
    assert expected <= set(contract_modules())


def test_the_contract_imports_without_the_api_or_the_model_stack() -> None:
    modules = _imported("\n".join(f"import {name}" for name in contract_modules()))

    assert "diffq.app.contract.store" in modules
    assert _offending(modules, CONTRACT_FORBIDDEN) == []


def test_the_boundary_check_sees_a_forbidden_import() -> None:
    # The check above must be able to fail: the API's settings module is on the forbidden list.
    modules = _imported("import diffq.app.contract.keys\nimport diffq.app.settings")

    assert "diffq.app.settings" in _offending(modules, CONTRACT_FORBIDDEN)


# The Python client runs with a plain `pip install diffq` (= diffq[client]) and nothing else: a blocker in
# a fresh interpreter refuses every import outside the standard library, `app` and the distributions that
# pyproject's client dependencies install (followed through their own requirements).

BLOCKER = """
import importlib.abc, sys
ALLOWED = set(sys.argv[1].split(","))

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        top = name.partition(".")[0]
        if top in sys.stdlib_module_names or top in ALLOWED:
            return None
        raise ModuleNotFoundError(f"No module named {name!r} (not installed by diffq[client])", name=name)

sys.meta_path.insert(0, Blocker())
"""

# What the client must never need: the server's and the workers' dependencies.
SERVER_DISTRIBUTIONS = {"fastapi", "starlette", "uvicorn", "pydantic", "pydantic-settings", "redis", "rq", "pillow",
                        "boto3", "torch", "diffusers", "numpy"}


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _client_distributions() -> set[str]:
    """The distributions ``pip install diffq[client]`` installs: the base and the client extra, with
    their requirements (markers evaluated here, extras followed)."""
    project = _pyproject()
    todo = [Requirement(text) for text in project["dependencies"] + project["optional-dependencies"]["client"]]
    found: set[str] = set()
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in found and not requirement.extras:
            continue
        found.add(name)
        for text in metadata.requires(name) or []:
            child = Requirement(text)
            extras = {""} | requirement.extras
            if child.marker is None or any(child.marker.evaluate({"extra": extra}) for extra in extras):
                todo.append(child)
    return found


def _client_import_names() -> set[str]:
    distributions = _client_distributions()
    return {top for top, owners in metadata.packages_distributions().items()
            if any(canonicalize_name(owner) in distributions for owner in owners)} | {"diffq"}


def test_the_client_extra_is_the_plain_install_and_holds_nothing_of_the_server() -> None:
    project = _pyproject()
    assert project["optional-dependencies"]["client"] == project["dependencies"]
    distributions = _client_distributions()
    assert {"httpx", "tqdm"} <= distributions
    assert distributions & SERVER_DISTRIBUTIONS == set()
    assert "diffq[api]" in project["optional-dependencies"]["worker"]  # a worker installs the server's part too


def test_the_blocker_refuses_what_the_client_extra_does_not_install() -> None:
    script = BLOCKER + "import diffq.app.client\nimport diffq.app.settings\n"
    result = subprocess.run([sys.executable, "-c", script, ",".join(sorted(_client_import_names()))],
                            capture_output=True, text=True, timeout=60, cwd=REPO)

    assert result.returncode != 0 and "not installed by diffq[client]" in result.stderr, result.stderr


@pytest.fixture(scope="module")
def api(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    with services(redis_server.url, tmp_path_factory.mktemp("api")) as started:
        yield started


def test_the_client_and_its_commands_run_with_only_the_client_extra(
    api: Services, redis: Redis, settings: Settings, engine: Engine, served: ModelRecord, tmp_path: Path
) -> None:
    output = tmp_path / "circle.png"
    script = BLOCKER + textwrap.dedent(f"""
        import json, os
        from diffq.app import client, client_batches
        from diffq.app.cli import main

        os.environ["DIFFQ_URL"] = {api.url!r}  # the address as a client-only install reads it
        code = main(["generate", "a red circle", "--steps", "8", "--seed", "7", "-o", {str(output)!r}])
        # The server's commands, here without their modules, say what to install instead of a traceback.
        servers = [main(["api"]), main(["verify", "image.png"]), main(["keys", "list"])]
        print(json.dumps({{"code": code, "servers": servers, "modules": sorted(sys.modules)}}))
    """)
    process = subprocess.Popen([sys.executable, "-c", script, ",".join(sorted(_client_import_names()))],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        wait_for(lambda: redis.llen(f"rq:queue:{queue_name(served.name)}") >= 1 or process.poll() is not None,
                 timeout=60)
        work(settings, engine)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()

    assert process.returncode == 0, stderr
    answer = json.loads(stdout.splitlines()[-1])
    assert answer["code"] == 0 and output.read_bytes().startswith(b"\x89PNG"), stderr
    assert answer["servers"] == [2, 2, 2] and stderr.count("pip install 'diffq[api]'") == 3, stderr
    assert "tqdm" in answer["modules"] and "httpx" in answer["modules"]  # the progress bar ran
    assert _offending(answer["modules"], ("diffq.app.settings", "pydantic", "redis", "fastapi")) == []


# Training stays out of the runtime path: a real `diffq worker` process loads a model and runs a job with
# Python's import log on (PYTHONPROFILEIMPORTTIME: every import, lazy ones included, to its stderr).

def _import_log(text: str) -> list[str]:
    """The modules an ``-X importtime`` log names."""
    return [line.rsplit("|", 1)[1].strip() for line in text.splitlines() if line.startswith("import time:")]


def test_the_import_log_names_a_training_module_when_one_is_imported() -> None:
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "import diffq.model.training.shapes_data"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)

    assert _offending(_import_log(result.stderr), ("diffq.model.training",)) == ["diffq.model.training", "diffq.model.training.shapes_data"]


def test_a_worker_loads_its_model_and_runs_a_job_without_the_training_code(
    redis_server: EmbeddedRedis, redis: Redis, tiny_model: Path, tmp_path: Path
) -> None:
    with services(redis_server.url, tmp_path, worker=tiny_model, ready="/readyz", PYTHONPROFILEIMPORTTIME="1") as up:
        with httpx.Client(base_url=up.url, timeout=30) as http:
            job = http.post("/v1/jobs", json={"prompt": "a red circle", "steps": 4, "seed": 1}).json()
            wait_for(lambda: http.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded", timeout=120)
        worker_imports = _import_log((tmp_path / "worker.log").read_text(errors="replace"))

    assert {"diffq.model.engine", "diffq.worker.runner", "diffusers"} <= set(worker_imports)  # the log covers the job's run
    assert _offending(worker_imports, ("diffq.model.training",)) == []
