"""Tiny random-initialised diffusers pipelines, built from configs, saved to folders.

They have the structure of the real checkpoints the engine serves (Stable
Diffusion 1.x, 2.x with v-prediction, SDXL with two text encoders, an LCM-distilled
SD 1.x whose UNet takes the guidance scale as an input) at a size
that runs two denoising steps in milliseconds on a CPU. Nothing is
downloaded: the CLIP tokenizers are built from a vocab.json/merges.txt
written here. Each pipeline is saved with `save_pretrained`, so tests load it
through the engine's real loader.

The vocabulary is single characters only and lacks "q", "x", "z" and digits,
so a word like "zebra" contains an unknown token: that is how the tests make
the tokenizer report unknown words.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

#: Letters the tiny tokenizers know; words using any other letter are "unknown".
KNOWN_LETTERS = "".join(c for c in string.ascii_lowercase if c not in "qxz")
#: Image side in pixels: UNet sample_size 8 times the VAE's factor 2.
IMAGE_SIZE = 16
#: Channels of the VAE latents.
LATENT_CHANNELS = 4
#: Hidden size of each text encoder (SDXL concatenates two).
TEXT_WIDTH = 32


def write_tokenizer_files(folder: Path, *, unk_token: str | None = None) -> CLIPTokenizer:
    """Write a character-level CLIP vocab.json/merges.txt to `folder` and load it.

    `unk_token=None` keeps CLIP's convention that the unknown token is
    "<|endoftext|>" (shared with end-of-text); a string adds it as a token of
    its own, as a word-level tokenizer would.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"] + ([unk_token] if unk_token else [])
    for symbol in KNOWN_LETTERS + ",.!'":
        tokens += [symbol, symbol + "</w>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    kwargs = {"unk_token": unk_token} if unk_token else {}
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77, **kwargs)


def _text_config(tokenizer: CLIPTokenizer, **overrides) -> CLIPTextConfig:
    config = dict(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.update(overrides)
    return CLIPTextConfig(**config)


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def _unet(**overrides) -> UNet2DConditionModel:
    config = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=IMAGE_SIZE // 2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config)


def build_sd1(folder: Path, seed: int = 0) -> Path:
    """An SD-1.x-style pipeline (epsilon prediction, PNDM config) saved to `folder`."""
    return _build_sd1_style(StableDiffusionPipeline, folder, seed, unet_in_channels=LATENT_CHANNELS)


def build_sd1_inpaint(folder: Path, seed: int = 0) -> Path:
    """An SD-1.x-style inpainting checkpoint: the UNet takes 9 channels (latents, mask, masked image)."""
    return _build_sd1_style(StableDiffusionInpaintPipeline, folder, seed, unet_in_channels=2 * LATENT_CHANNELS + 1)


def _build_sd1_style(pipeline_class: type, folder: Path, seed: int, unet_in_channels: int) -> Path:
    torch.manual_seed(seed)
    tokenizer = write_tokenizer_files(folder.parent / f"{folder.name}-vocab")
    pipe = pipeline_class(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(tokenizer, hidden_act="quick_gelu")),
        tokenizer=tokenizer,
        unet=_unet(in_channels=unet_in_channels),
        scheduler=PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            skip_prk_steps=True,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def build_lcm(folder: Path, seed: int = 0) -> Path:
    """An LCM-distilled SD-1.x-style pipeline (diffusers' LatentConsistencyModelPipeline): an LCM
    scheduler distilled on 50 steps (its original_inference_steps), a UNet that takes the guidance
    scale as an embedding, and, like the real ones, no negative prompt."""
    torch.manual_seed(seed)
    tokenizer = write_tokenizer_files(folder.parent / f"{folder.name}-vocab")
    pipe = LatentConsistencyModelPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(tokenizer, hidden_act="quick_gelu")),
        tokenizer=tokenizer,
        unet=_unet(time_cond_proj_dim=8),
        scheduler=LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                               original_inference_steps=50),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def build_sd2_vpred(folder: Path, seed: int = 0) -> Path:
    """An SD-2.x-style pipeline: v-prediction, zero terminal SNR, trailing timesteps.

    The unknown token is a separate "<unk>" token, unlike CLIP's.
    """
    torch.manual_seed(seed)
    tokenizer = write_tokenizer_files(folder.parent / f"{folder.name}-vocab", unk_token="<unk>")
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(tokenizer, hidden_act="gelu")),
        tokenizer=tokenizer,
        unet=_unet(use_linear_projection=True),
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            timestep_spacing="trailing",
            steps_offset=1,
            clip_sample=False,
            set_alpha_to_one=False,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def build_sdxl(folder: Path, seed: int = 0) -> Path:
    """An SDXL-style pipeline: two text encoders (the second with a projection), text_time conditioning."""
    torch.manual_seed(seed)
    tokenizer = write_tokenizer_files(folder.parent / f"{folder.name}-vocab")
    tokenizer_2 = write_tokenizer_files(folder.parent / f"{folder.name}-vocab-2")
    addition_time_embed_dim = 8
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(tokenizer, hidden_act="gelu")),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden_act="gelu", projection_dim=32)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=_unet(
            use_linear_projection=True,
            cross_attention_dim=2 * TEXT_WIDTH,
            addition_embed_type="text_time",
            addition_time_embed_dim=addition_time_embed_dim,
            transformer_layers_per_block=(1, 2),
            # Six size/crop numbers embedded, plus text_encoder_2's pooled projection.
            projection_class_embeddings_input_dim=6 * addition_time_embed_dim + 32,
        ),
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            timestep_spacing="leading",
            steps_offset=1,
            clip_sample=False,
            set_alpha_to_one=False,
        ),
    )
    pipe.save_pretrained(folder)
    return folder
