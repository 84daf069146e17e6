"""diffq.model.adapters through diffq.model.engine: LoRA adapters per request on a tiny SD 1.x pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffq.model.engine import Engine, GenerationRequest, InvalidRequestError
from tests.tiny_loras import write_tiny_lora

REQUEST = dict(prompt="a red circle", steps=2, seed=5)


@pytest.fixture(scope="module")
def lora_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    write_tiny_lora(tiny_model, folder, "ink", base_model="tiny", seed=1)
    write_tiny_lora(tiny_model, folder, "paper", base_model="tiny", seed=2)
    return folder


@pytest.fixture(scope="module")
def lora_engine(tiny_model: Path, lora_dir: Path) -> Engine:
    return Engine.load(tiny_model, device="cpu", dtype="float32", lora_dir=lora_dir, lora_cache_size=2)


def pixels(engine: Engine, **fields) -> np.ndarray:
    [result] = engine.generate([GenerationRequest(**{**REQUEST, **fields})])
    return np.asarray(result.images[0])


def test_an_adapter_changes_the_image_and_removing_it_gives_a_fresh_engines_pixels(
    tiny_model: Path, lora_dir: Path, lora_engine: Engine
) -> None:
    fresh = pixels(Engine.load(tiny_model, device="cpu", dtype="float32"))
    with_ink = pixels(lora_engine, loras=(("ink", 1.0),))
    after = pixels(lora_engine)
    assert not np.array_equal(with_ink, fresh)
    assert np.array_equal(after, fresh)
    assert "ink" in lora_engine.adapters.loaded  # cached for the next job that wants it


def test_two_adapters_combine_and_their_weights_matter(lora_engine: Engine) -> None:
    ink, paper = pixels(lora_engine, loras=(("ink", 1.0),)), pixels(lora_engine, loras=(("paper", 1.0),))
    both = pixels(lora_engine, loras=(("ink", 1.0), ("paper", 0.5)))
    weaker = pixels(lora_engine, loras=(("ink", 1.0), ("paper", 0.25)))
    assert not np.array_equal(both, ink) and not np.array_equal(both, paper)
    assert not np.array_equal(both, weaker)
    assert np.array_equal(pixels(lora_engine, loras=(("ink", 1.0), ("paper", 0.5))), both)


def test_requests_with_different_adapters_run_in_different_groups_with_their_own_pixels(lora_engine: Engine) -> None:
    alone = [pixels(lora_engine, loras=loras) for loras in ((("ink", 1.0),), (), (("ink", 0.5),))]
    requests = [GenerationRequest(**REQUEST, loras=loras) for loras in ((("ink", 1.0),), (), (("ink", 0.5),))]
    resolved = [lora_engine.validate(r) for r in requests]
    assert lora_engine._batch_groups(resolved) == [[0], [1], [2]]
    together = [np.asarray(r.images[0]) for r in lora_engine.generate(requests)]
    for got, expected in zip(together, alone, strict=True):
        assert np.array_equal(got, expected)


def test_parameters_name_each_adapter_with_its_weight_and_file_hash(lora_engine: Engine, lora_dir: Path) -> None:
    import hashlib

    [result] = lora_engine.generate([GenerationRequest(**REQUEST, loras=(("ink", 0.75),))])
    digest = hashlib.sha256((lora_dir / "ink.safetensors").read_bytes()).hexdigest()
    assert result.parameters["loras"] == [{"name": "ink", "weight": 0.75, "sha256": digest}]


@pytest.mark.parametrize(("loras", "message"), [
    ((("nope", 1.0),), "unknown adapter 'nope'; available: ink, paper"),
    ((("ink", 2.5),), "accepted: -2.0 to 2.0"),
    ((("ink", float("nan")),), "accepted: -2.0 to 2.0"),
    ((("ink", 1.0), ("ink", 0.5)), "appears twice"),
])
def test_bad_adapters_are_refused_naming_what_is_accepted(lora_engine: Engine, loras, message: str) -> None:
    with pytest.raises(InvalidRequestError, match="^loras: ") as raised:
        lora_engine.validate(GenerationRequest(**REQUEST, loras=loras))
    assert message in str(raised.value)


def test_the_cache_keeps_at_most_its_size_and_drops_the_least_recently_used(
    tiny_model: Path, lora_dir: Path
) -> None:
    engine = Engine.load(tiny_model, device="cpu", dtype="float32", lora_dir=lora_dir, lora_cache_size=1)
    fresh_ink = pixels(engine, loras=(("ink", 1.0),))
    pixels(engine, loras=(("paper", 1.0),))
    assert engine.adapters.loaded == ["paper"]
    assert np.array_equal(pixels(engine, loras=(("ink", 1.0),)), fresh_ink)
