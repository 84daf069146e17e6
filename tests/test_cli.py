"""app/cli.py: the `diffq` command and its options."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from diffq.app.cli import _settings, build_parser
from tests.helpers import clean_environment, diffq_command


def test_diffq_offers_up_api_and_worker() -> None:
    result = subprocess.run([*diffq_command(), "--help"], capture_output=True, text=True, timeout=60,
                            env=clean_environment())
    assert result.returncode == 0
    for command in ("up", "api", "worker", "webhooks"):
        assert command in result.stdout


def test_worker_options_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFQ_DEVICE", "cuda")
    monkeypatch.setenv("DIFFQ_MAX_STEPS", "7")
    args = build_parser().parse_args(["worker", "--model", "/models/sd15", "--name", "sd15", "--dtype", "float16"])

    settings = _settings(args, model="model_path", name="model_name", device="device", dtype="dtype")

    assert (settings.model_path, settings.model_name, settings.dtype) == (Path("/models/sd15"), "sd15", "float16")
    assert (settings.device, settings.max_steps) == ("cuda", 7)  # unset options keep the environment's


def test_up_port_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFQ_PORT", "9000")
    assert _settings(build_parser().parse_args(["up"]), port="port").port == 9000
    assert _settings(build_parser().parse_args(["up", "--port", "9001"]), port="port").port == 9001


def test_worker_without_a_model_folder_says_so_and_exits_2(tmp_path: Path) -> None:
    result = subprocess.run([*diffq_command(), "worker", "--model", str(tmp_path / "nothing")], capture_output=True,
                            text=True, timeout=120, env=clean_environment())
    assert result.returncode == 2
    assert f"diffq worker: cannot serve {tmp_path / 'nothing'}" in result.stderr
    assert "model_index.json" in result.stderr
