"""app/settings.py: one Settings object, DIFFQ_-prefixed environment variables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from diffq.app.settings import Settings, default_model_path

REPO = Path(__file__).resolve().parent.parent


def test_environment_variables_use_the_diffq_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFQ_REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("DIFFQ_MAX_STEPS", "12")
    monkeypatch.setenv("REDIS_URL", "redis://ignored")

    settings = Settings()

    assert (settings.redis_url, settings.max_steps) == ("redis://example:6380/2", 12)
    assert "redis_url" in settings.model_fields_set  # how `diffq up` knows not to embed Redis
    monkeypatch.delenv("DIFFQ_REDIS_URL")
    assert "redis_url" not in Settings().model_fields_set


def test_invalid_values_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFQ_MAX_IMAGES_PER_JOB", "0")
    with pytest.raises(ValueError, match="max_images_per_job"):
        Settings()


def test_default_model_is_the_bundled_shapes_folder_found_without_importing_model() -> None:
    assert default_model_path() == REPO / "model" / "shapes"
    script = "import sys; from diffq.app.settings import Settings; Settings(); print('diffq.model' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_settings_page_lists_every_setting() -> None:
    table = (REPO / "docs" / "settings.md").read_text()
    missing = [name for name in Settings.model_fields if f"| `DIFFQ_{name.upper()}`" not in table]
    assert missing == []
