"""A job's LoRA adapters: the `loras` field and A1111's `<lora:name:weight>` prompt tags,
checked against the adapter folder and the model's family, resolved to exact files.

Both ways of asking mean the same: the tags are taken out of the prompt (the text encoder
never sees them) and appended, in order, to the `loras` list. Every problem names the
field and what is available for the model; nothing is dropped or clipped quietly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from diffq.app.contract.adapters import MAX_PER_REQUEST, MAX_WEIGHT, AdapterInfo, fits, parse_prompt
from diffq.app.contract.records import LoraParam, ModelRecord
from diffq.app.core.errors import FieldProblem
from diffq.app.schemas.jobs import LoraRequest


def resolve_loras(
    prompt: str, requested: Sequence[LoraRequest], model: ModelRecord, adapters: Sequence[AdapterInfo]
) -> tuple[str, list[LoraParam], list[FieldProblem]]:
    """The prompt without tags, the adapters to apply, and what is wrong with them."""
    cleaned, tags = parse_prompt(prompt)
    wanted: list[tuple[str, str, float | None]] = [
        (f"loras[{i}]", lora.name, lora.weight) for i, lora in enumerate(requested)
    ]
    problems: list[FieldProblem] = []
    for name, text in tags:
        weight = _tag_weight(text)
        if weight is None:
            problems.append(
                FieldProblem(
                    "prompt",
                    f"<lora:{name}:{text}>: the weight must be a number from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}",
                )
            )
        wanted.append(("prompt", name, weight))
    if tags and not cleaned.strip():
        problems.append(FieldProblem("prompt", "holds only <lora:…> tags; say what to draw too"))
    if len(wanted) > MAX_PER_REQUEST:
        problems.append(
            FieldProblem(
                "loras",
                f"at most {MAX_PER_REQUEST} adapters per job (the list and the "
                f"prompt's <lora:…> tags together); got {len(wanted)}",
            )
        )
    by_name = {adapter.name: adapter for adapter in adapters}
    usable = ", ".join(a.name for a in adapters if fits(a, model.family)) or "none"
    resolved: list[LoraParam] = []
    for field, name, weight in wanted:
        adapter = by_name.get(name)
        if adapter is None:
            problems.append(
                FieldProblem(field, f"unknown adapter {name!r}; available for model {model.name!r}: {usable}")
            )
        elif not fits(adapter, model.family):
            problems.append(
                FieldProblem(
                    field,
                    f"adapter {name!r} is for base model {adapter.base_model!r}, not "
                    f"model {model.name!r} ({model.family}); available for it: {usable}",
                )
            )
        elif any(p.name == name for p in resolved):
            problems.append(FieldProblem(field, f"adapter {name!r} is asked for twice"))
        elif weight is not None:
            resolved.append(LoraParam(name=name, weight=weight, sha256=adapter.sha256))
    return cleaned if tags else prompt, resolved, problems


def _tag_weight(text: str) -> float | None:
    """A tag's weight: "" means 1 (A1111's default); None if not a number in range."""
    if not text:
        return 1.0
    try:
        weight = float(text)
    except ValueError:
        return None
    return weight if math.isfinite(weight) and abs(weight) <= MAX_WEIGHT else None
