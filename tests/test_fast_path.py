"""The GPU fast path (model/engine.py, worker/service.py) and out-of-memory handling (worker/runner.py).

There is no GPU here: the fast path is forced on the CPU to check what it sets
on a tiny pipeline, the CPU default is checked to be the plain pipeline, and
CUDA running out of memory is the real `torch.OutOfMemoryError` raised by the
tiny UNet when a call has more images than a pretend capacity, through a real
worker on a real Redis.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from diffq.model.engine import Engine, GenerationRequest, _resolve_dtype, is_out_of_memory
from tests.helpers import TINY_JOB, job_of, post, work

REQUEST = GenerationRequest(prompt="a red circle", steps=2, seed=7, num_images=2)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def conv_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.dim() == 4 and p.shape[-1] > 1]


def attention_processors(engine: Engine) -> set[str]:
    return {type(p).__name__ for part in (engine.pipe.unet, engine.pipe.vae) for p in part.attn_processors.values()}


# -- the engine ----------------------------------------------------------------------------------


def test_cpu_default_is_the_plain_pipeline_and_gives_the_same_bytes(tiny_model, engine) -> None:
    default = Engine.load(tiny_model, device="cpu")
    off = Engine.load(tiny_model, device="cpu", fast_path=False)

    assert default.fast_path == [] and default.info.dtype == "float32"
    for part in (default.pipe.unet, default.pipe.vae):
        assert all(w.is_contiguous() and not w.is_contiguous(memory_format=torch.channels_last)
                   for w in conv_weights(part))
        assert part._compiled_call_impl is None
    assert (default.pipe.vae.use_tiling, default.pipe.vae.use_slicing) == (False, False)
    ours, plain = default.generate([REQUEST])[0], off.generate([REQUEST])[0]
    for a, b in zip(ours.images, plain.images, strict=True):
        assert a.tobytes() == b.tobytes()


def test_dtype_auto_is_float16_on_cuda_and_float32_on_the_cpu() -> None:
    assert _resolve_dtype("auto", torch.device("cuda")) == "float16"
    assert _resolve_dtype("auto", torch.device("cpu")) == "float32"


def test_forced_fast_path_sets_sdpa_and_channels_last_and_keeps_the_images(tiny_model) -> None:
    plain = Engine.load(tiny_model, device="cpu", fast_path=False)
    fast = Engine.load(tiny_model, device="cpu", fast_path=True)

    assert attention_processors(fast) == {"AttnProcessor2_0"}
    assert attention_processors(plain) == {"AttnProcessor2_0"}  # diffusers' default on torch 2 already
    for part in (fast.pipe.unet, fast.pipe.vae):
        weights = conv_weights(part)
        assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert any("SDPA" in item for item in fast.fast_path)
    assert any("channels_last" in item for item in fast.fast_path)
    assert not any("compile" in item for item in fast.fast_path)
    for a, b in zip(fast.generate([REQUEST])[0].images, plain.generate([REQUEST])[0].images, strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() <= 2  # float rounding of another memory layout


def test_vae_tiles_and_slices_only_above_the_threshold_and_is_restored(tiny_model) -> None:
    engine = Engine.load(tiny_model, device="cpu", fast_path=True, vae_tiling_pixels=24 * 24)
    vae = engine.pipe.vae
    seen: list[tuple[bool, bool]] = []
    decode = vae.decode

    def spy(*args, **kwargs):
        seen.append((vae.use_tiling, vae.use_slicing))
        return decode(*args, **kwargs)

    vae.decode = spy
    small = GenerationRequest(prompt="a red circle", steps=2, seed=1, width=16, height=16)
    engine.generate([small])  # 256 px: neither
    engine.generate([GenerationRequest(**{**small.__dict__, "num_images": 3})])  # 768 px in one call: slices
    [large] = engine.generate([GenerationRequest(**{**small.__dict__, "width": 32, "height": 32})])  # 1024: tiles

    assert seen == [(False, False), (False, True), (True, True)]
    assert (vae.use_tiling, vae.use_slicing) == (False, False)
    assert large.images[0].size == (32, 32)
    assert "VAE tiling above 576 pixels" in " ".join(engine.fast_path)


def test_no_tiling_without_the_fast_path_or_with_threshold_0(tiny_model) -> None:
    for engine in (Engine.load(tiny_model, device="cpu", vae_tiling_pixels=1),
                   Engine.load(tiny_model, device="cpu", fast_path=True, vae_tiling_pixels=0)):
        vae, seen, decode = engine.pipe.vae, [], engine.pipe.vae.decode
        vae.decode = lambda *a, **k: (seen.append((vae.use_tiling, vae.use_slicing)), decode(*a, **k))[1]
        engine.generate([REQUEST])
        assert seen == [(False, False)]


def test_compile_compiles_the_unet_in_place_and_warm_up_runs_it(tiny_model, monkeypatch) -> None:
    compiled: list[dict] = []

    def fake_compile(fn, **kwargs):  # inductor on a CPU takes minutes: record the call, run eagerly
        compiled.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    engine = Engine.load(tiny_model, device="cpu", fast_path=True, compile=True, compile_mode="default")
    calls: list[int] = []
    generate = engine.generate
    monkeypatch.setattr(engine, "generate", lambda requests, on_step=None: (
        calls.append(sum(r.num_images for r in requests)), generate(requests, on_step))[1])

    assert compiled == [{"mode": "default"}]
    assert type(engine.pipe.unet).__name__ == "UNet2DConditionModel"  # in place: config, from_pipe unchanged
    assert engine.pipe.unet._compiled_call_impl is not None
    assert "torch.compile(unet, mode='default')" in engine.fast_path
    assert engine.warm_up((1, 2)) > 0
    assert calls == [1, 2]
    assert Engine.load(tiny_model, device="cpu", compile=True).pipe.unet._compiled_call_impl is None  # no fast path


def test_bad_compile_mode_or_threshold_is_refused(tiny_model) -> None:
    with pytest.raises(ValueError, match="compile_mode"):
        Engine.load(tiny_model, device="cpu", compile_mode="fastest")
    with pytest.raises(ValueError, match="vae_tiling_pixels"):
        Engine.load(tiny_model, device="cpu", vae_tiling_pixels=-1)


def test_only_torchs_out_of_memory_error_counts_as_out_of_memory() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("CUDA out of memory (pretend)"))
    assert not is_out_of_memory(MemoryError())


def test_worker_start_logs_and_warms_up_the_fast_path(tiny_model, settings, monkeypatch, caplog) -> None:
    from diffq.worker.service import load_engine

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    warmed: list[tuple] = []
    monkeypatch.setattr(Engine, "warm_up", lambda self, sizes=(1,): warmed.append(tuple(sizes)) or 0.1)
    base = settings.model_copy(update={"model_path": tiny_model, "device": "cpu", "preview_decoder": "off"})
    with caplog.at_level(logging.INFO, logger="diffq.worker.service"):
        plain = load_engine(base)
        fast = load_engine(base.model_copy(update={"fast_path": "on", "compile": True}))

    assert plain.fast_path == [] and warmed == [(1, 2)]
    assert any("torch.compile" in item for item in fast.fast_path)
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("fast path off on cpu (float32)") for m in messages)
    assert any(m.startswith("fast path on cpu (float32): SDPA attention") and "torch.compile" in m for m in messages)
    assert any(m.startswith("warm-up at 16x16, batch sizes [1, 2]") for m in messages)


# -- out of memory through the real worker -------------------------------------------------------


@pytest.fixture
def capacity(engine, monkeypatch) -> list[int]:
    """Make the tiny UNet raise CUDA's real out-of-memory error for calls of more than
    `capacity[0]` images (the UNet sees twice the images with classifier-free guidance).
    Returns the list, to change the capacity, and records each call's image count after it."""
    state = [2]
    unet = engine.pipe.unet
    forward = unet.forward

    def limited(sample, *args, **kwargs):
        images = sample.shape[0] // 2  # TINY_JOB's guidance 7.5: the UNet runs cond and uncond together
        if images > state[0]:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {images} GiB. GPU 0 has a total capacity of "
                f"{state[0]} GiB\nof which ... (pretend, from the test)"
            )
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", limited)
    return state


@pytest.fixture
def calls(engine, monkeypatch) -> list[list[int]]:
    """Seeds of every engine.generate call, and how often the engine freed memory (as -1)."""
    seen: list[list[int]] = []
    generate, free = engine.generate, engine.free_memory
    monkeypatch.setattr(engine, "generate", lambda requests, on_step=None: (
        seen.append([r.seed for r in requests]), generate(requests, on_step))[1])
    monkeypatch.setattr(engine, "free_memory", lambda: (seen.append([-1]), free())[1])
    return seen


def image(client: TestClient, job_id: str, index: int = 0) -> np.ndarray:
    png = client.get(f"/v1/jobs/{job_id}/images/{index}.png").content
    return pixels(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.mark.usefixtures("served")
def test_a_batch_out_of_memory_runs_again_in_halves_with_the_same_images(
    client, settings, engine, capacity, calls
) -> None:
    bodies = [{**TINY_JOB, "prompt": f"a red circle {n}", "seed": n} for n in range(5)]
    ids = [post(client, body) for body in bodies]
    work(settings.model_copy(update={"batch_max": 5}), engine)

    # 5 jobs > 2 images: halves of 3 and 2; the 3 split again into 2 and 1.
    assert calls == [[0, 1, 2, 3, 4], [-1], [0, 1, 2], [-1], [0, 1], [2], [3, 4]]
    assert [job_of(client, job_id)["status"] for job_id in ids] == ["succeeded"] * 5
    capacity[0] = 100
    alone = [post(client, body) for body in bodies]
    work(settings.model_copy(update={"batch_max": 1}), engine)
    for split, single in zip(ids, alone, strict=True):
        assert np.abs(image(client, split) - image(client, single)).max() <= 2  # tests/test_batching.py's bound


@pytest.mark.usefixtures("served")
def test_a_job_too_big_alone_fails_out_of_memory_and_the_worker_takes_the_next(
    client, redis, settings, engine, capacity, calls
) -> None:
    too_big = post(client, {**TINY_JOB, "num_images": 3, "seed": 10})
    fits = post(client, {**TINY_JOB, "num_images": 2, "seed": 20})
    after = post(client, {**TINY_JOB, "steps": 3, "seed": 30})  # another shape: runs after, alone
    work(settings, engine)

    assert calls == [[10, 20], [-1], [10], [-1], [20], [30]]
    failed = job_of(client, too_big)
    assert failed["status"] == "failed" and failed["images"] == []
    assert failed["error"]["code"] == "out_of_memory"
    message = failed["error"]["message"]
    assert message.startswith("3 image(s) of 16×16 do not fit in this worker's cpu memory, even run alone")
    assert "OutOfMemoryError: CUDA out of memory. Tried to allocate 3 GiB" in message and "\n" not in message
    assert message.endswith("ask for fewer images or a smaller size")
    for job_id, count in ((fits, 2), (after, 1)):
        job = job_of(client, job_id)
        assert job["status"] == "succeeded" and len(job["images"]) == count, job


@pytest.mark.usefixtures("served")
def test_out_of_memory_one_job_at_a_time_fails_only_that_job(client, settings, engine, capacity, calls) -> None:
    capacity[0] = 1
    ids = [post(client, {**TINY_JOB, "seed": 1}), post(client, {**TINY_JOB, "num_images": 2, "seed": 2}),
           post(client, {**TINY_JOB, "seed": 3})]
    work(settings.model_copy(update={"batch_max": 1}), engine)

    assert calls == [[1], [2], [-1], [3]]
    assert [job_of(client, job_id)["status"] for job_id in ids] == ["succeeded", "failed", "succeeded"]
    assert job_of(client, ids[1])["error"]["code"] == "out_of_memory"
