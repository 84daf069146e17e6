"""diffq.model.engine on tiny random pipelines (SD 1.x, SD 2.x v-prediction, SDXL), two steps on the CPU."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffq.model.engine import (
    Engine,
    GenerationRequest,
    GenerationResult,
    InvalidRequestError,
    ModelLoadError,
    StopGeneration,
    UnknownSchedulerError,
    weights_hash,
)
from diffq.model.prompt_check import prompt_warnings
from diffq.model.schedulers import SCHEDULERS, scheduler_class
from tests.tiny_pipelines import IMAGE_SIZE, LATENT_CHANNELS, build_sd1, build_sd2_vpred, build_sdxl

MODELS = ("sd1", "sd2", "sdxl")


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    folders = {
        "sd1": build_sd1(root / "sd1"),
        "sd2": build_sd2_vpred(root / "sd2-v"),
        "sdxl": build_sdxl(root / "sdxl"),
    }
    # SD 1.x again, declared LCM-capable with its own defaults, as the training code writes it.
    shutil.copytree(folders["sd1"], root / "sd1-lcm")
    settings = {"name": "tiny-lcm", "lcm": True, "default_scheduler": "lcm", "default_steps": 2,
                "default_guidance_scale": 1.0, "default_width": 24, "default_height": 8, "training": {"seed": 1}}
    (root / "sd1-lcm" / "diffq.json").write_text(json.dumps(settings))
    folders["sd1-lcm"] = root / "sd1-lcm"
    return folders


@pytest.fixture(scope="session")
def engines(folders) -> dict[str, Engine]:
    # The CPU is shared: tiny models gain nothing from threads and lose a lot to contention.
    torch.set_num_threads(1)
    return {key: Engine.load(folder) for key, folder in folders.items()}


@pytest.fixture(params=MODELS)
def each_engine(request, engines) -> Engine:
    return engines[request.param]


@pytest.fixture
def sd1(engines) -> Engine:
    return engines["sd1"]


def pixels(result: GenerationResult, k: int = 0) -> np.ndarray:
    return np.asarray(result.images[k], dtype=np.int16)


def assert_close(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float rounding of batched kernels (a step of the 8-bit output)."""
    assert np.abs(a - b).max() <= 2


# -- importing -----------------------------------------------------------------------------------


def test_importing_model_does_not_import_torch():
    code = (
        "import sys, model, diffq.model.engine, diffq.model.schedulers, diffq.model.prompt_check\n"
        "from diffq.model import Engine, GenerationRequest, SCHEDULERS\n"
        "heavy = {'torch', 'diffusers', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# -- loading -------------------------------------------------------------------------------------


def test_load_sd1(engines, folders):
    info = engines["sd1"].info
    assert info.name == "sd1"
    assert info.pipeline_class == "StableDiffusionPipeline"
    assert (info.device, info.dtype) == ("cpu", "float32")
    # UNet sample size 8 x VAE factor 2; sizes in steps of 8 (VAE 2 x UNet 2 = 4, but diffusers wants 8).
    assert (info.default_width, info.default_height, info.size_multiple) == (IMAGE_SIZE, IMAGE_SIZE, 8)
    assert (info.min_size, info.max_size) == (8, 32)
    assert (info.default_steps, info.max_steps, info.default_guidance_scale) == (30, 150, 7.5)
    assert info.default_scheduler == "pndm"  # the folder's PNDMScheduler (PLMS)
    assert info.schedulers == ["ddim", "dpmpp_2m", "euler", "euler_a", "unipc", "pndm"]
    assert info.weights_hash == weights_hash(folders["sd1"])
    assert len(info.weights_hash) == 64 and int(info.weights_hash, 16) >= 0
    assert engines["sd1"].pipe.safety_checker is None


def test_load_sd2_v_prediction(engines):
    info = engines["sd2"].info
    assert info.default_scheduler == "ddim"
    assert engines["sd2"].pipe.scheduler.config.prediction_type == "v_prediction"
    # PNDM has no zero-terminal-SNR option: it would sample another noise schedule.
    assert "pndm" not in info.schedulers and "lcm" not in info.schedulers


def test_load_sdxl(engines):
    info = engines["sdxl"].info
    assert info.pipeline_class == "StableDiffusionXLPipeline"
    assert (info.default_width, info.default_height) == (IMAGE_SIZE, IMAGE_SIZE)
    assert info.weights_hash not in {engines["sd1"].info.weights_hash, engines["sd2"].info.weights_hash}


def test_load_reads_diffq_json(engines):
    info = engines["sd1-lcm"].info
    assert info.name == "tiny-lcm"
    assert info.schedulers[-1] == "lcm" and info.default_scheduler == "lcm"
    assert (info.default_width, info.default_height, info.default_steps) == (24, 8, 2)
    assert info.default_guidance_scale == 1.0
    assert info.weights_hash == engines["sd1"].info.weights_hash  # same weights, other settings


def test_lcm_steps_are_limited_by_its_distillation(engines):
    engine = engines["sd1-lcm"]
    [result] = engine.generate([GenerationRequest("a red circle")])
    assert result.parameters["scheduler"] == "lcm" and result.images[0].size == (24, 8)
    with pytest.raises(InvalidRequestError, match="steps: 51 is out of range; accepted: 1..50"):
        engine.validate(GenerationRequest("a red circle", steps=51))
    assert engine.validate(GenerationRequest("a red circle", steps=51, scheduler="ddim")).steps == 51


def test_load_rejects_inconsistent_diffq_json(folders, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(folders["sd1"], folder)
    (folder / "diffq.json").write_text(json.dumps({"default_width": 18, "default_scheduler": "lcm"}))
    with pytest.raises(ModelLoadError, match="default_width 18 .*default_scheduler 'lcm'"):
        Engine.load(folder)


def test_load_errors(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        Engine.load(tmp_path)
    with pytest.raises(ValueError, match="dtype: 'float8'.*float16, bfloat16, float32"):
        Engine.load(folders["sd1"], dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: 'cuda'.*not available"):
            Engine.load(folders["sd1"], device="cuda")


# -- validation ----------------------------------------------------------------------------------


def test_validate_fills_in_defaults(sd1):
    resolved = sd1.validate(GenerationRequest(prompt="a red circle"))
    assert resolved == GenerationRequest(
        prompt="a red circle", width=16, height=16, steps=30, guidance_scale=7.5, scheduler="pndm"
    )
    assert sd1.validate(resolved) == resolved


@pytest.mark.parametrize(
    "field, value, accepted",
    [
        ("prompt", "  ", "must not be empty"),
        ("prompt", None, "must be a string"),
        ("negative_prompt", 3, "must be a string"),
        ("width", 20, "not a multiple of 8"),
        ("width", 36, "accepted: 8..32"),
        ("height", 4, "accepted: 8..32"),
        ("height", 16.0, "not an integer"),
        ("steps", 0, "accepted: 1..150"),
        ("steps", 151, "accepted: 1..150"),
        ("guidance_scale", -1.0, "accepted: 0..50"),
        ("guidance_scale", 51.0, "accepted: 0..50"),
        ("guidance_scale", float("nan"), "not a finite number"),
        ("num_images", 0, "accepted: 1..8"),
        ("num_images", True, "not an integer"),
        ("seed", -1, "accepted: 0.."),
        ("seed", 2**32, "accepted: 0..4294967295"),
        ("scheduler", "k_lms", "accepted: ddim, dpmpp_2m, euler, euler_a, unipc, pndm"),
        ("scheduler", "lcm", "accepted: ddim,"),  # known name, but not for this model
    ],
)
def test_validate_errors_name_the_field(sd1, field, value, accepted):
    request = GenerationRequest(**{"prompt": "a red circle", field: value})
    with pytest.raises(InvalidRequestError) as caught:
        sd1.validate(request)
    assert isinstance(caught.value, ValueError)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert accepted in str(caught.value)


def test_unknown_scheduler_error_lists_names(sd1):
    with pytest.raises(UnknownSchedulerError) as caught:
        sd1.generate([GenerationRequest("a red circle", scheduler="heun")])
    assert all(name in str(caught.value) for name in sd1.info.schedulers)


# -- generation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key, name", [(key, name) for key in ("sd1", "sd2", "sdxl", "sd1-lcm") for name in SCHEDULERS])
def test_every_scheduler_runs_two_steps(engines, key, name):
    engine = engines[key]
    request = GenerationRequest("a red circle", steps=2, scheduler=name)
    if name not in engine.info.schedulers:
        with pytest.raises(UnknownSchedulerError):
            engine.generate([request])
        return
    original = engine.pipe.scheduler
    seen = []

    def on_step(step, total, latents, denoised):
        seen.append((type(engine.pipe.scheduler), engine.pipe.scheduler.config.prediction_type))

    [result] = engine.generate([request], on_step)
    image = result.images[0]
    assert image.mode == "RGB" and image.size == (engine.info.default_width, engine.info.default_height)
    assert result.parameters["scheduler"] == name and result.parameters["steps"] == 2
    # The scheduler is swapped in for the call only, configured like the model's own.
    assert seen and set(seen) == {(scheduler_class(name), original.config.prediction_type)}
    assert engine.pipe.scheduler is original


def test_same_request_same_pixels(each_engine):
    request = GenerationRequest("a red circle", negative_prompt="blue", steps=2, scheduler="euler_a", seed=7)
    first, second = each_engine.generate([request]), each_engine.generate([request])
    assert np.array_equal(pixels(first[0]), pixels(second[0]))
    assert first[0].seeds == [7]


def test_image_k_uses_seed_plus_k(each_engine):
    common = dict(prompt="a red circle", steps=2, scheduler="euler_a")
    [pair] = each_engine.generate([GenerationRequest(**common, seed=10, num_images=2)])
    [alone] = each_engine.generate([GenerationRequest(**common, seed=11)])
    assert pair.seeds == [10, 11]
    assert_close(pixels(pair, 1), pixels(alone, 0))
    assert not np.array_equal(pixels(pair, 0), pixels(pair, 1))


def test_batched_requests_match_requests_run_alone(each_engine):
    requests = [
        GenerationRequest("a red circle", steps=2, scheduler="euler_a", seed=1),
        GenerationRequest("a blue square", negative_prompt="red", steps=2, scheduler="euler_a", seed=2, num_images=2),
    ]
    batched = each_engine.generate(requests)
    for request, together in zip(requests, batched):
        [alone] = each_engine.generate([request])
        for k in range(request.num_images):
            assert_close(pixels(together, k), pixels(alone, k))


def test_incompatible_requests_run_in_groups_in_request_order(sd1):
    requests = [
        GenerationRequest("a red circle", steps=2, scheduler="ddim"),
        GenerationRequest("a red circle", steps=3, scheduler="ddim", width=8, height=24),
        GenerationRequest("a blue square", steps=2, scheduler="ddim", num_images=2),
        GenerationRequest("a blue square", steps=2, scheduler="euler"),
    ]
    calls = []
    results = sd1.generate(requests, lambda step, total, latents, denoised: calls.append((step, total, sorted(latents))))
    assert [len(result.images) for result in results] == [1, 1, 2, 1]
    assert results[1].images[0].size == (8, 24)
    assert calls == [(1, 2, [0, 2]), (2, 2, [0, 2]), (1, 3, [1]), (2, 3, [1]), (3, 3, [1]), (1, 2, [3]), (2, 2, [3])]


def test_on_step_gets_each_requests_latents(sd1):
    requests = [
        GenerationRequest("a red circle", steps=2, scheduler="ddim", num_images=2, width=8, height=24),
        GenerationRequest("a blue square", steps=2, scheduler="ddim", width=8, height=24),
    ]
    calls = []
    sd1.generate(requests, lambda step, total, latents, denoised: calls.append((step, total, latents, denoised)))
    assert [(step, total) for step, total, _, _ in calls] == [(1, 2), (2, 2)]
    for _, _, latents, denoised in calls:
        # VAE factor 2: (num_images, channels, height / 2, width / 2).
        for tensors in (latents, denoised):
            assert {index: tuple(tensor.shape) for index, tensor in tensors.items()} == {
                0: (2, LATENT_CHANNELS, 12, 4),
                1: (1, LATENT_CHANNELS, 12, 4),
            }
        assert not torch.equal(latents[0], denoised[0])  # DDIM's x̂0, not the noisy latents


def test_pndm_reports_its_extra_timestep(sd1):
    calls = []
    sd1.generate([GenerationRequest("a red circle", steps=2, scheduler="pndm")], lambda *args: calls.append(args[:2]))
    assert calls == [(1, 3), (2, 3), (3, 3)]  # PLMS steps timestep 1 twice


def test_stop_generation_stops_between_steps(each_engine):
    request = GenerationRequest("a red circle", steps=3, scheduler="dpmpp_2m", seed=3)
    [before] = each_engine.generate([request])
    steps = []

    def stop_after_first(step, total, latents, denoised):
        steps.append(step)
        raise StopGeneration

    with pytest.raises(StopGeneration):
        each_engine.generate([request], stop_after_first)
    assert steps == [1]
    # Nothing of the stopped run leaks into the next one (scheduler state, pipeline's scheduler).
    [after] = each_engine.generate([request])
    assert np.array_equal(pixels(before), pixels(after))


def test_callers_own_exception_propagates(sd1):
    class Canceled(Exception):
        pass

    def cancel(step, total, latents, denoised):
        raise Canceled

    with pytest.raises(Canceled):
        sd1.generate([GenerationRequest("a red circle", steps=2)], cancel)


# -- warnings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["sd1", "sd2"])  # unknown token shared with end-of-text, and separate
def test_unknown_words_are_reported(engines, key):
    request = GenerationRequest("a zebra, on the left", negative_prompt="fuzzy", steps=2)
    [result] = engines[key].generate([request])
    assert result.warnings == [
        "word 'zebra' is not in the model's vocabulary and was ignored",
        "word 'fuzzy' of the negative prompt is not in the model's vocabulary and was ignored",
    ]


def test_known_words_give_no_warnings(each_engine):
    [result] = each_engine.generate([GenerationRequest("a red circle on the left, blue background", steps=2)])
    assert result.warnings == []


def test_truncated_prompt_is_reported(sd1):
    prompt = " ".join(["red"] * 24 + ["blue", "circle"])  # 3 tokens per word here, 75 fit
    [result] = sd1.generate([GenerationRequest(prompt, steps=2)])
    assert result.warnings == ["prompt truncated after 77 tokens; this part was ignored: 'blue circle'"]


def test_negative_prompt_without_guidance_is_reported(sd1):
    [result] = sd1.generate([GenerationRequest("a red circle", negative_prompt="blue", guidance_scale=1.0, steps=2)])
    assert result.warnings == [
        "negative prompt ignored: guidance_scale 1.0 turns classifier-free guidance off (it needs guidance_scale > 1)"
    ]


def test_word_level_tokenizer_with_its_own_unknown_token():
    """Like the shapes model's tokenizer: whole words, punctuation split off, anything else unknown."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "<|unknown|>": 2, "a": 3, "red": 4, "circle": 5, ",": 6}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|unknown|>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|unknown|>"
    )
    assert prompt_warnings([tokenizer], "a red circle, a red cat.") == [
        "word 'cat' is not in the model's vocabulary and was ignored",
        "word '.' is not in the model's vocabulary and was ignored",
    ]
