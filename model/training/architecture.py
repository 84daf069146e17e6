"""The shapes model's parts, as diffusers/transformers configs: one place sets every size.

Two presets: "shapes" is the model the repository ships; "tiny" is a few-thousand-parameter
copy with the same structure, for the smoke training that CI runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffq.model.training.tokenizer import MAX_LENGTH


@dataclass(frozen=True)
class Architecture:
    text_width: int  # CLIP hidden size, also the UNet's cross-attention width
    text_layers: int
    text_heads: int
    vae_channels: tuple[int, ...]  # one entry per VAE level; latents are 64 / 2**(levels-1) wide
    latent_channels: int
    unet_channels: tuple[int, ...]
    unet_layers: int  # resnet layers per UNet block
    unet_head_dim: int  # channels per attention head in every UNet block


PRESETS: dict[str, Architecture] = {
    "shapes": Architecture(
        text_width=128,
        text_layers=3,
        text_heads=4,
        vae_channels=(16, 32, 64),
        latent_channels=8,
        unet_channels=(64, 128, 192),
        unet_layers=1,
        unet_head_dim=32,
    ),
    "tiny": Architecture(
        text_width=32,
        text_layers=1,
        text_heads=2,
        vae_channels=(8, 16),
        latent_channels=4,
        unet_channels=(16, 32),
        unet_layers=1,
        unet_head_dim=8,
    ),
}


def build_text_encoder(arch: Architecture, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=arch.text_width,
        intermediate_size=arch.text_width * 4,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=arch.text_width,
    )
    return CLIPTextModel(config)


def build_vae(arch: Architecture):
    from diffusers import AutoencoderKL

    levels = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=arch.vae_channels,
        layers_per_block=1,
        latent_channels=arch.latent_channels,
        norm_num_groups=min(arch.vae_channels[0], 16),
        sample_size=64,
        # no mid-block attention: 64×64 flat-colour scenes don't need it, and it is slow on CPU
        mid_block_add_attention=False,
    )


def build_unet(arch: Architecture, latent_size: int):
    from diffusers import UNet2DConditionModel

    levels = len(arch.unet_channels)
    down = ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=arch.latent_channels,
        out_channels=arch.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=arch.unet_channels,
        layers_per_block=arch.unet_layers,
        cross_attention_dim=arch.text_width,
        # diffusers' UNet2DConditionModel reads `attention_head_dim` as the number of heads
        # (a naming bug it keeps for compatibility), so pass heads = channels / head size.
        # Passing 32 here once gave 32 heads of 2-6 channels: attention too thin to place
        # anything, and 2.8x slower to train on a CPU.
        attention_head_dim=tuple(c // arch.unet_head_dim for c in arch.unet_channels),
        norm_num_groups=min(arch.unet_channels[0], 32),
    )


def build_scheduler():
    """v-prediction on a zero-terminal-SNR schedule with trailing timesteps (Lin et al. 2023).

    With the usual schedule the last timestep still leaks the image's mean colour, so the
    model never learns to choose a background from pure noise; at zero terminal SNR it must.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        clip_sample=False,
        steps_offset=1,
    )
