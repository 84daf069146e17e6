"""GPU check of diffq's fast path: raw diffusers against diffq's worker path, fast path off and on.

On a GPU machine (no network needed; expected well under 10 minutes on one H100-class GPU,
not measured yet; a round starts only within --budget, 480 s, and gpu_check.sh stops it at 590 s):

    bash bench/gpu_check.sh                 # SD 1.5 architecture, 512×512, 20 steps, batch 1 and 8
    bash bench/gpu_check.sh --compile --compile-mode default    # adds a torch.compile row
    GPU_CHECK_TIMEOUT=1800 bash bench/gpu_check.sh --compile     # the worker's mode: a long compile

On any machine, much smaller, to check the script itself (about a minute on a CPU):

    bash bench/gpu_check.sh --tiny

What it does: builds a randomly initialised pipeline with the full Stable Diffusion 1.5
architecture from configs written below (UNet2DConditionModel, AutoencoderKL, CLIP ViT-L/14
text encoder; a character-level CLIP tokenizer written locally, as tests/tiny_pipelines.py does),
saves it as a diffusers folder (float16, ~2 GB) and times, for each row, one 20-step txt2img call
of batch 1 and of batch 8 (guidance 7.5, the folder's PNDM scheduler, CPU generators per image,
PIL output), interleaved over rounds after one warm-up call each. Random weights make noise
images; the time per step does not depend on the weights.

Rows:
  diffusers, float32          StableDiffusionPipeline.from_pretrained(...), nothing else
  diffusers, <dtype>          the same in the dtype diffq picks (float16 on CUDA); the baseline
  diffusers + fast path       the same with the fast path's settings applied by hand
  diffq, fast path off        Engine.generate as the worker calls it (one request per job, an
                              on_step callback), DIFFQ_FAST_PATH=off
  diffq, fast path on         the same with the fast path (the default on CUDA)
  diffq, fast path + compile  (--compile) the same with DIFFQ_COMPILE=1, after Engine.warm_up

Columns: seconds per image (median over rounds) at batch 1 and 8; each row against the
baseline row (< 1: faster); peak device memory allocated during the batch-8 call (CUDA).

Then the out-of-memory check: a real worker (run_worker, as in the tests) on an embedded Redis,
with the fast engine, takes 8 compatible jobs while the device is capped (CUDA:
torch.cuda.set_per_process_memory_fraction to a little more than batch 1 needs; --tiny on a CPU:
the UNet raises torch.OutOfMemoryError above 2 images, as tests/test_fast_path.py does): the
batch must run again in halves and succeed, a job of 8 images alone must fail with
`out_of_memory`, and the job after it must succeed.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import shutil
import statistics
import string
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Stable Diffusion 1.5's component configs (runwayml/stable-diffusion-v1-5), written out.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512, scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu", norm_num_groups=32,
)
SD15_TEXT = dict(  # openai/clip-vit-large-patch14's text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
)
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                      set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
# --tiny: the same structure, a few channels (tests/tiny_pipelines.py's sizes).
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=32, block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
)
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
PROMPTS = ["a photo of a red apple on a wooden table", "a watercolor painting of a lighthouse at dusk"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_tokenizer(folder: Path):
    """A character-level CLIP tokenizer (vocab.json + merges.txt) written here: no download."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    for symbol in string.ascii_lowercase + string.digits + ",.!'":
        tokens += [symbol, symbol + "</w>"]
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def build_pipeline(folder: Path, tiny: bool, device) -> Path:
    """A random-initialised SD 1.5-architecture pipeline (or --tiny's), saved as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = write_tokenizer(folder.parent / "tokenizer-source")
    text = dict(TINY_TEXT, vocab_size=len(tokenizer)) if tiny else SD15_TEXT
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    with torch.device(device):  # initialise on the GPU: seconds instead of a minute on the CPU
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE)),
            text_encoder=CLIPTextModel(CLIPTextConfig(**text, **ids)),
            tokenizer=tokenizer,
            unet=UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET)),
            scheduler=PNDMScheduler(**SD15_SCHEDULER),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    if not tiny:
        pipe.to(torch.float16)  # as SD 1.5 is usually stored; each row loads it in its own dtype
    pipe.save_pretrained(folder)
    return folder


class Row:
    """One way of generating: `run(batch, seed)` makes `batch` images and returns when they exist."""

    def __init__(self, label: str, dtype: str, run: Callable[[int, int], None], note: str = "") -> None:
        self.label, self.dtype, self.run, self.note = label, dtype, run, note
        self.times: dict[int, list[float]] = {}
        self.peak: dict[int, float] = {}


def raw_row(label: str, folder: Path, device, dtype: str, args, fast: bool) -> Row:
    import torch
    from diffusers import StableDiffusionPipeline

    from diffq.model.engine import _apply_fast_path

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=getattr(torch, dtype),
                                                       local_files_only=True, safety_checker=None,
                                                       requires_safety_checker=False)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    note = ""
    if fast:
        note = "; ".join(_apply_fast_path(pipe, compile_mode=None))

    def run(batch: int, seed: int) -> None:
        if fast:  # the engine's rule: slice the VAE decode when the call's pixels exceed the threshold
            pipe.vae.use_slicing = batch * args.size * args.size > args.vae_tiling_pixels
        pipe(prompt=[PROMPTS[k % 2] for k in range(batch)], height=args.size, width=args.size,
             num_inference_steps=args.steps, guidance_scale=7.5, output_type="pil",
             generator=[torch.Generator("cpu").manual_seed(seed + k) for k in range(batch)])

    return Row(label, dtype, run, note)


def engine_row(label: str, engine) -> Row:
    from diffq.model.engine import GenerationRequest

    def on_step(step, total, latents, denoised) -> None:  # the worker's callback, without Redis
        pass

    def run(batch: int, seed: int) -> None:
        engine.generate([GenerationRequest(prompt=PROMPTS[k % 2], width=ARGS.size, height=ARGS.size,
                                           steps=ARGS.steps, guidance_scale=7.5, seed=seed + k)
                         for k in range(batch)], on_step=on_step)

    return Row(label, engine.info.dtype, run, "; ".join(engine.fast_path) or "plain pipeline")


def time_call(row: Row, batch: int, seed: int, device) -> float:
    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    row.run(batch, seed)
    if cuda:
        torch.cuda.synchronize()
        row.peak[batch] = max(row.peak.get(batch, 0.0), (torch.cuda.max_memory_allocated() - base) / 2**30)
    return time.perf_counter() - started


def out_of_memory_check(folder: Path, engine, device, fast_row: Row, args) -> list[str]:
    """Eight compatible jobs through a real worker on an embedded Redis, with the device capped."""
    import torch
    from fastapi.testclient import TestClient
    from redis import Redis

    from diffq.app.contract.records import WorkerRecord, utcnow
    from diffq.app.contract.registry import Registry
    from diffq.app.contract.tasks import queue_name
    from diffq.app.embedded_redis import EmbeddedRedis
    from diffq.app.main import create_app
    from diffq.app.settings import Settings
    from diffq.worker.service import model_record, run_worker

    lines = []
    server = EmbeddedRedis()
    server.start()
    settings = Settings(_env_file=None, redis_url=server.url, auth="off", model_path=folder, batch_max=8,
                        max_images_per_job=8, preview_decoder="off", heartbeat_interval=0.5, log_level="warning")
    restore = None
    try:
        model = model_record(engine)
        now = utcnow()
        Registry(Redis.from_url(server.url), ttl=600).announce(WorkerRecord(
            id="gpu-check", model=model.name, device=model.device, dtype=model.dtype, host="localhost", pid=1,
            queue=queue_name(model.name), started_at=now, heartbeat_at=now), model)
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(device).total_memory
            one, most = (fast_row.peak.get(b, float("nan")) * 2**30 for b in (1, max(args.batches)))
            cap = torch.cuda.memory_allocated() + (one + most) / 2
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
            lines.append(f"device capped at {cap / 2**30:.2f} GiB: the weights plus halfway between the "
                         f"{one / 2**30:.2f} GiB batch 1 used and the {most / 2**30:.2f} GiB batch "
                         f"{max(args.batches)} used")
            restore = lambda: torch.cuda.set_per_process_memory_fraction(1.0, device)  # noqa: E731
        else:
            forward = engine.pipe.unet.forward

            def limited(sample, *a, **k):
                if sample.shape[0] > 4:  # more than 2 images with guidance
                    raise torch.OutOfMemoryError("CUDA out of memory (simulated on the CPU above 2 images)")
                return forward(sample, *a, **k)

            engine.pipe.unet.forward = limited
            restore = lambda: delattr(engine.pipe.unet, "forward")  # noqa: E731
            lines.append("CPU: the UNet raises torch.OutOfMemoryError for calls of more than 2 images")
        calls: list[int] = []
        generate = engine.generate
        engine.generate = lambda requests, on_step=None: (calls.append(len(requests)), generate(requests, on_step))[1]
        job = {"width": args.size, "height": args.size, "steps": 2, "guidance_scale": 7.5}
        with TestClient(create_app(settings)) as client:
            ids = [client.post("/v1/jobs", json={**job, "prompt": PROMPTS[n % 2], "seed": n}).json()["id"]
                   for n in range(8)]
            started = time.perf_counter()
            run_worker(settings, engine=engine, burst=True)
            batch = [client.get(f"/v1/jobs/{i}").json() for i in ids]
            lines.append(f"8 jobs of 1 image: engine calls of {calls} jobs, statuses "
                         f"{sorted({j['status'] for j in batch})}, {time.perf_counter() - started:.1f} s")
            calls.clear()
            big = client.post("/v1/jobs", json={**job, "prompt": PROMPTS[0], "num_images": 8}).json()["id"]
            after = client.post("/v1/jobs", json={**job, "prompt": PROMPTS[1], "steps": 3}).json()["id"]
            run_worker(settings, engine=engine, burst=True)
            failed, next_job = client.get(f"/v1/jobs/{big}").json(), client.get(f"/v1/jobs/{after}").json()
            lines.append(f"1 job of 8 images: {failed['status']} {failed['error'] and failed['error']['code']}; "
                         f"the next job: {next_job['status']}")
            ok = (all(j["status"] == "succeeded" for j in batch) and failed["status"] == "failed"
                  and failed["error"]["code"] == "out_of_memory" and next_job["status"] == "succeeded")
            lines.append("OOM check: " + ("PASS" if ok else "FAIL") + (
                "" if ok else f" ({failed.get('error')})"))
    finally:
        engine.__dict__.pop("generate", None)
        if restore is not None:
            restore()
        server.stop()
    return lines


def main() -> int:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model (32×32) that runs on a CPU in a minute")
    parser.add_argument("--size", type=int, help="image side in pixels (default 512, --tiny 32)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, help="timed rounds (default 5, --tiny 2)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cuda, cpu")
    parser.add_argument("--compile", action="store_true", help="add a row with the UNet torch.compile'd")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (default: the engine's)")
    parser.add_argument("--vae-tiling-pixels", type=int, default=None, help="default: the engine's")
    parser.add_argument("--budget", type=float, default=480, help="seconds after which no new round starts")
    parser.add_argument("--no-oom-check", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None, help="where the model folder goes (default: a temp dir)")
    ARGS = args = parser.parse_args()
    args.size = args.size or (32 if args.tiny else 512)
    args.rounds = args.rounds or (2 if args.tiny else 5)
    began = time.perf_counter()

    import torch

    from diffq.model.engine import DEFAULT_COMPILE_MODE, DEFAULT_VAE_TILING_PIXELS, Engine, _resolve_device, _resolve_dtype

    warnings.filterwarnings("ignore", category=RuntimeWarning)  # random weights: NaN pixels in float16
    args.compile_mode = args.compile_mode or DEFAULT_COMPILE_MODE
    if args.vae_tiling_pixels is None:
        args.vae_tiling_pixels = DEFAULT_VAE_TILING_PIXELS
    device = _resolve_device(args.device)
    dtype = _resolve_dtype("auto", device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    workdir = Path(tempfile.mkdtemp(prefix="diffq-gpu-check-", dir=args.workdir))
    atexit.register(shutil.rmtree, workdir, True)  # the model folder: ~2 GB at full size
    log(f"building the {'tiny' if args.tiny else 'SD 1.5-architecture'} pipeline in {workdir} on {device}")
    folder = build_pipeline(workdir / ("tiny" if args.tiny else "sd15-random"), args.tiny, device)
    log(f"built and saved in {time.perf_counter() - began:.0f} s")

    rows: list[Row] = []
    if dtype != "float32":
        rows.append(raw_row("diffusers, float32", folder, device, "float32", args, fast=False))
    rows.append(raw_row(f"diffusers, {dtype}", folder, device, dtype, args, fast=False))
    baseline = rows[-1]
    rows.append(raw_row("diffusers + fast path", folder, device, dtype, args, fast=True))
    load = dict(device=str(device), vae_tiling_pixels=args.vae_tiling_pixels)
    rows.append(engine_row("diffq, fast path off", Engine.load(folder, fast_path=False, **load)))
    fast_engine = Engine.load(folder, fast_path=True, **load)
    fast_row = engine_row("diffq, fast path on", fast_engine)
    rows.append(fast_row)
    warm_up = None
    if args.compile:
        compiled = Engine.load(folder, fast_path=True, compile=True, compile_mode=args.compile_mode, **load)
        log(f"compiling the UNet ({args.compile_mode}): warm-up at the default size, batch 1 and 2")
        warm_up = compiled.warm_up((1, 2))
        rows.append(engine_row("diffq, fast path + compile", compiled))
    log(f"loaded {len(rows)} rows in {time.perf_counter() - began:.0f} s; warming up each")

    for row in rows:
        for batch in args.batches:
            row.warm = time_call(row, batch, 0, device)
    rounds = 0
    for r in range(1, args.rounds + 1):
        if time.perf_counter() - began > args.budget:
            log(f"budget of {args.budget:.0f} s reached: stopping after {rounds} rounds")
            break
        for row in rows:
            for batch in args.batches:
                row.times.setdefault(batch, []).append(time_call(row, batch, 1000 * r, device) / batch)
        rounds += 1
        log(f"round {r} done at {time.perf_counter() - began:.0f} s")

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\ndiffq gpu_check: {'tiny model' if args.tiny else 'SD 1.5 architecture (random weights)'}, "
          f"{args.size}x{args.size}, {args.steps} steps, PNDM, guidance 7.5; device {name}; torch {torch.__version__}; "
          f"{rounds} rounds (median)")
    batches = args.batches
    head = ["row", "dtype"] + [f"b{b} s/img" for b in batches] + [f"b{b} vs base" for b in batches]
    if device.type == "cuda":
        head.append(f"b{batches[-1]} peak GiB")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        medians = [statistics.median(row.times[b]) if row.times.get(b) else float("nan") for b in batches]
        bases = [statistics.median(baseline.times[b]) if baseline.times.get(b) else float("nan") for b in batches]
        cells = [row.label + (" (base)" if row is baseline else ""), row.dtype]
        cells += [f"{m:.3f}" for m in medians] + [f"{m / b:.2f}" for m, b in zip(medians, bases)]
        if device.type == "cuda":
            cells.append(f"{row.peak.get(batches[-1], float('nan')):.2f}")
        print("| " + " | ".join(cells) + " |")
    if warm_up is not None:
        print(f"compile warm-up (batch 1 and 2, {args.compile_mode}): {warm_up:.0f} s")
    print("fast path applied (diffq): " + "; ".join(fast_engine.fast_path))

    status = 0
    if not args.no_oom_check:
        for row in rows:
            if row is not fast_row:
                row.run = None
        del rows
        gc.collect()
        try:
            for line in out_of_memory_check(folder, fast_engine, device, fast_row, args):
                print(line)
                status = status or int(line.startswith("OOM check: FAIL"))
        except Exception as error:  # report it, with the table already printed
            print(f"OOM check: ERROR {type(error).__name__}: {error}")
            status = 1
    print(f"total {time.perf_counter() - began:.0f} s")
    return status


ARGS: argparse.Namespace
if __name__ == "__main__":
    sys.exit(main())
