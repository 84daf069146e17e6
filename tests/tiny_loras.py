"""Tiny LoRA adapter files for the tiny test pipelines, written the way diffusers writes LoRAs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict


def write_tiny_lora(model: Path, folder: Path, name: str, *, base_model: str | None, seed: int = 0,
                    scale: float = 0.3) -> Path:
    """`<folder>/<name>.safetensors`: a rank-2 adapter on `model`'s UNet attention with random
    (not identity) weights, so it visibly changes images; `base_model` goes in `<name>.json`."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = {k: v * scale for k, v in get_peft_model_state_dict(unet).items()}  # peft's key names, as diffq.model.training.train
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=f"{name}.safetensors")
    if base_model is not None:
        (folder / f"{name}.json").write_text(json.dumps({"base_model": base_model}))
    return folder / f"{name}.safetensors"
