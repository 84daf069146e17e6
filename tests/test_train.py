"""Smoke training: every stage of `python -m model.train` on the tiny preset, then a plain
diffusers pipeline call on the result. It keeps the training code working; it does not
retrain the shipped model."""

import json
import logging
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def run(*args):
    subprocess.run([sys.executable, "-m", "model.train", *args], check=True, capture_output=True, text=True)


def test_train_all_stages_resume_and_export(tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    common = ["--preset", "tiny", "--run", str(tmp_path / "run"), "--batch", "4", "--save-every", "2"]
    run("vae", *common, "--steps", "4")
    run("decoder", *common, "--steps", "2")
    run("unet", *common, "--steps", "3")
    run("unet", *common, "--steps", "5")  # resumes from step 3
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any(r["stage"] == "vae" and r["step"] == 4 for r in log)
    out = tmp_path / "model"
    run("export", *common, "--out", str(out))
    record = json.loads((out / "training.json").read_text())
    assert (record["vae_steps"], record["decoder_steps"], record["unet_steps"]) == (4, 2, 5)

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        pipe = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert not [r for r in records if r.levelno >= logging.WARNING], [r.getMessage() for r in records]
    image = pipe("a red circle", num_inference_steps=2).images[0]
    assert image.size == (64, 64)
