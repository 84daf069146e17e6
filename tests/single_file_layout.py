"""Write a diffusers SD-1.x-style pipeline folder as one `.safetensors` file in the original
(LDM / A1111 / Civitai) key layout, so tests can serve a single-file checkpoint without a download.

The inverse of the renames diffusers' `from_single_file` applies
(`diffusers.loaders.single_file_utils.convert_ldm_{unet,vae,clip}_checkpoint`); the tests check
it by loading the file back and comparing images with the folder's, byte for byte.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import save_file
from transformers import CLIPTextModel

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _unet_key(key: str, layers: int) -> str:
    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    if key in top:
        return top[key]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{i * (layers + 1) + j + 1}.{0 if kind == 'resnets' else 1}.{_resnet(rest, kind)}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        index = 2 * int(m[2]) if m[1] == "resnets" else 1
        return f"middle_block.{index}.{_resnet(m[3], m[1])}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{i * (layers + 1) + j}.{0 if kind == 'resnets' else 1}.{_resnet(rest, kind)}"
    raise KeyError(key)


def _resnet(rest: str, kind: str) -> str:
    if kind == "resnets":
        for new, old in _RESNET:
            rest = re.sub(rf"^{re.escape(new)}\.", f"{old}.", rest)
    return rest


def _unet_state(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    layers = unet.config.layers_per_block
    state = {}
    for key, value in unet.state_dict().items():
        if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            i = int(m[1])
            slot = 2 if f"up_blocks.{i}.attentions.0.proj_in.weight" in unet.state_dict() else 1
            state[f"output_blocks.{i * (layers + 1) + layers}.{slot}.conv.{m[2]}"] = value
        else:
            state[_unet_key(key, layers)] = value
    return {f"model.diffusion_model.{k}": v for k, v in state.items()}


def _vae_state(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    ups = len(vae.config.up_block_types)
    state = {}
    for key, value in vae.state_dict().items():
        if key in top:
            new = top[key]
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
            rest = m[2]
            for diffusers_name, ldm_name in _VAE_ATTENTION:
                rest = re.sub(rf"^{re.escape(diffusers_name)}\.", f"{ldm_name}.", rest)
            new = f"{m[1]}.mid.attn_1.{rest}"
            if value.ndim == 2:  # LDM keeps attention projections as 1×1 convolutions
                value = value[:, :, None, None]
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"decoder.up.{ups - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            new = f"decoder.up.{ups - 1 - int(m[1])}.upsample.conv.{m[2]}"
        else:
            raise KeyError(key)
        state[f"first_stage_model.{new}"] = value
    return state


def write_single_file(folder: Path, out: Path, *, config: Path | None = None) -> Path:
    """`folder` (an SD-1.x-style diffusers pipeline) as one LDM-layout `.safetensors` file at `out`;
    with `config`, also the `<name>.json` naming the folder whose configs it uses."""
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    text = CLIPTextModel.from_pretrained(folder / "text_encoder")
    state = {**_unet_state(unet), **_vae_state(vae)}
    # The original layout nests CLIP's weights under text_model. (transformers 5 flattened it away)
    state.update({f"cond_stage_model.transformer.{k if k.startswith('text_model.') else 'text_model.' + k}": v
                  for k, v in text.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, out)
    if config is not None:
        out.with_suffix(".json").write_text(json.dumps({"config": str(config)}))
    return out
