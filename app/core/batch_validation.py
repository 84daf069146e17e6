"""Judging a batch's items: each by the single job's rules, all before anything is written.

``validated`` turns every item (defaults applied) into a ``JobCreate`` with this deployment's
limits, collecting the problems of the first bad items, each named by where the item was in
the request (``items[3].steps``, ``line 4.steps``). ``shared_inputs`` prepares the inputs of
items that use one of the batch's shared images, once per distinct use.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from pydantic import TypeAdapter, ValidationError

from diffq.app.contract.records import ModelRecord
from diffq.app.core.batch_items import BatchSpec
from diffq.app.core.errors import FieldProblem, InvalidRequestError
from diffq.app.core.inputs import PreparedInputs
from diffq.app.schemas.batches import CUSTOM_ID_RULE, batch_item_model
from diffq.app.schemas.jobs import JobCreate
from diffq.app.settings import Settings

#: Most problems one refusal lists.
MAX_PROBLEMS = 20
#: Prefix of an item's ``image``/``mask`` that names one of the batch's shared inputs.
SHARED = "input:"

Prepare = Callable[[JobCreate, dict[str, bytes], ModelRecord], PreparedInputs]


def validated(spec: BatchSpec, settings: Settings) -> list[tuple[str, JobCreate]]:
    """Every item as a job request (defaults applied), with its custom_id; all problems of the
    first bad items at once, naming each item's line or index."""
    count, most = len(spec.items), settings.max_batch_items
    if not 1 <= count <= most:
        raise InvalidRequestError(
            [FieldProblem("items", f"has {count} items; a batch holds 1 to {most} (DIFFQ_MAX_BATCH_ITEMS)")]
        )
    model = batch_item_model(settings)
    merged = [{**spec.defaults, **raw.fields} for raw in spec.items]
    for n, fields in enumerate(merged):
        fields.setdefault("custom_id", str(n))
    try:  # every item in one call; when one fails, item by item, to name each problem's item
        bodies = _all_of(model).validate_json(json.dumps(merged), strict=True)
    except ValidationError:
        bodies = None
    problems: list[FieldProblem] = []
    items: list[tuple[str, JobCreate]] = []
    seen: dict[str, str] = {}
    for n, raw in enumerate(spec.items):
        if bodies is not None:
            item = bodies[n]
        else:
            try:
                item = model.model_validate_json(json.dumps(merged[n]), strict=True)
            except ValidationError as error:
                problems.extend(_problems(raw.where, error))
                if len(problems) >= MAX_PROBLEMS:
                    break
                continue
        custom_id = item.custom_id  # type: ignore[attr-defined]
        if custom_id in seen:
            problems.append(
                FieldProblem(
                    f"{raw.where}.custom_id",
                    f"{custom_id!r} is also the custom_id of {seen[custom_id]}; each item needs its own",
                )
            )
        seen[custom_id] = raw.where
        items.append((custom_id, item))  # a JobCreate; build reads the job fields, never custom_id
    if problems:
        raise InvalidRequestError(problems[:MAX_PROBLEMS])
    return items


@lru_cache(maxsize=8)
def _all_of(model: type[JobCreate]) -> TypeAdapter[list[JobCreate]]:
    return TypeAdapter(list[model])  # type: ignore[valid-type]


def shared_inputs(
    body: JobCreate, spec: BatchSpec, model: ModelRecord, cache: dict[tuple[Any, ...], PreparedInputs], prepare: Prepare
) -> PreparedInputs | None:
    """An item's inputs when its image or mask names a shared input: decoded once per distinct
    use (the same image, mask, size and mode), however many items use it."""
    refs = {name: getattr(body, name) for name in ("image", "mask")}
    if not any(isinstance(v, str) and v.startswith(SHARED) for v in refs.values()):
        return None
    files: dict[str, bytes] = {}
    update: dict[str, Any] = {}
    for name, ref in refs.items():
        if isinstance(ref, str) and ref.startswith(SHARED):
            shared = spec.inputs.get(ref[len(SHARED) :])
            if shared is None:
                raise InvalidRequestError(
                    [
                        FieldProblem(
                            name,
                            f"{ref!r} names no shared input; the batch's inputs: {', '.join(spec.inputs) or 'none'}",
                        )
                    ]
                )
            if isinstance(shared, bytes):
                files[name], update[name] = shared, None
            else:
                update[name] = shared
    key = (
        refs["image"],
        refs["mask"],
        body.mode,
        body.width,
        body.height,
        getattr(body, "resize", None),
        body.outpaint.model_dump_json() if body.outpaint else None,
    )
    if key not in cache:
        cache[key] = prepare(body.model_copy(update=update), files, model)
    return cache[key]


def one_model(items: list[tuple[str, JobCreate]]) -> str | None:
    """The model every item names (None: the default); a batch runs on one."""
    names = {body.model for _, body in items}
    if len(names) > 1:
        listing = ", ".join(sorted(str(n) for n in names))
        raise InvalidRequestError([FieldProblem("model", f"a batch runs on one model; its items name {listing}")])
    return next(iter(names))


def _problems(where: str, error: ValidationError) -> list[FieldProblem]:
    problems = []
    for detail in error.errors(include_url=False):
        loc = ".".join(str(part) for part in detail.get("loc", ()))
        message = str(detail.get("msg", "invalid"))
        if loc == "custom_id":
            message = f"{message}; a custom_id is {CUSTOM_ID_RULE}"
        problems.append(FieldProblem(f"{where}.{loc}" if loc else where, message))
    return problems
