"""``/v1/loras``: the LoRA adapters jobs may apply (``DIFFQ_LORA_DIR``)."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter

from diffq.app.contract.adapters import list_adapters
from diffq.app.deps import SettingsDep
from diffq.app.schemas.loras import LoraList, LoraPublic

router = APIRouter(prefix="/v1/loras", tags=["models"])


@router.get("", response_model=LoraList, summary="List LoRA adapters")
def list_loras(settings: SettingsDep) -> LoraList:
    return LoraList(loras=[LoraPublic(**dataclasses.asdict(a)) for a in list_adapters(settings.lora_dir)])
