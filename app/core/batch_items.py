"""A batch's items from what the client sent: a JSON list, a JSONL file, or a template and rows.

Each item comes out as a ``RawItem``: where it came from (``items[3]``, ``line 4``), so a
refusal can name it, and its job fields before validation. Nothing here judges job fields;
``diffq.app.core.batches`` validates every item with the single job's rules.
"""

from __future__ import annotations

import csv
import io
import json
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from diffq.app.core.errors import FieldProblem, InvalidRequestError
from diffq.app.schemas.batches import BatchCreate

#: Item fields that come from a template row, besides the placeholders' values.
ROW_FIELDS = ("custom_id", "seed", "negative_prompt")


@dataclass(frozen=True)
class BatchSpec:
    """A batch request, from any of its forms: items, shared settings and shared input files."""

    items: list[RawItem]
    defaults: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, bytes | str] = field(default_factory=dict)  # files (bytes) or base64 text
    webhook: dict[str, Any] | None = None
    priority: str = "low"
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_body(cls, body: BatchCreate, items: list[RawItem]) -> BatchSpec:
        return cls(
            items=items,
            defaults=body.defaults,
            inputs=dict(body.inputs),
            webhook=body.webhook.model_dump() if body.webhook else None,
            priority=body.priority,
            metadata=body.metadata,
        )


@dataclass(frozen=True)
class RawItem:
    """One item's job fields as sent, and where it was in the request (for error messages)."""

    where: str
    fields: dict[str, Any]


def from_list(items: list[dict[str, Any]]) -> list[RawItem]:
    """``items`` of a JSON body."""
    return [RawItem(f"items[{n}]", dict(item)) for n, item in enumerate(items)]


def from_jsonl(data: bytes, field: str = "file") -> list[RawItem]:
    """One JSON object per line (blank lines skipped); a line that is not one is a 422 naming it."""
    text = _text(data, field)
    items, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(
                FieldProblem(
                    f"line {number}",
                    f"is not valid JSON ({error.msg}); each line must be "
                    'one job object, e.g. {"custom_id": "a", "prompt": "a red circle"}',
                )
            )
            continue
        if not isinstance(value, dict):
            problems.append(FieldProblem(f"line {number}", "must be a JSON object (one job per line)"))
            continue
        items.append(RawItem(f"line {number}", value))
    if problems:
        raise InvalidRequestError(problems[:20])
    return items


def csv_rows(data: bytes, field: str = "file") -> list[tuple[str, dict[str, str]]]:
    """CSV with a header line: each row by column name, with its line number."""
    reader = csv.DictReader(io.StringIO(_text(data, field), newline=""))
    if not reader.fieldnames:
        raise InvalidRequestError([FieldProblem(field, "is an empty CSV; the first line must name the columns")])
    rows = []
    for row in reader:
        if None in row:
            raise InvalidRequestError(
                [FieldProblem(f"line {reader.line_num}", f"has more values than the {len(reader.fieldnames)} columns")]
            )
        rows.append((f"line {reader.line_num}", {k: v for k, v in row.items() if v is not None}))
    return rows


def json_rows(rows: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """``rows`` of a JSON body."""
    return [(f"rows[{n}]", row) for n, row in enumerate(rows)]


def from_template(template: str, rows: Iterable[tuple[str, Mapping[str, Any]]]) -> list[RawItem]:
    """One item per row: the prompt is ``template`` with each ``{column}`` replaced by the row's
    value; the row's ``custom_id``, ``seed`` and ``negative_prompt`` columns, if any, go to the item."""
    names = placeholders(template)
    items = []
    for where, row in rows:
        missing = [name for name in names if name not in row]
        if missing:
            raise InvalidRequestError(
                [
                    FieldProblem(
                        where,
                        f"has no {', '.join(missing)} for the template's "
                        f"placeholders; its columns: {', '.join(row) or 'none'}",
                    )
                ]
            )
        fields: dict[str, Any] = {"prompt": template.format_map({name: row[name] for name in names})}
        for name in ROW_FIELDS:
            if name in row and row[name] != "":
                fields[name] = _seed(where, row[name]) if name == "seed" else str(row[name])
        items.append(RawItem(where, fields))
    return items


def placeholders(template: str) -> list[str]:
    """The ``{column}`` names of a prompt template; anything but plain names is a 422."""
    names = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise InvalidRequestError(
            [
                FieldProblem(
                    "prompt_template",
                    f"is not a valid template ({error}); write "
                    "{column} for a value and {{ }} for a literal brace",
                )
            ]
        ) from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise InvalidRequestError(
                [
                    FieldProblem(
                        "prompt_template",
                        f"has {{{name}{'!' + conversion if conversion else ''}"
                        f"{':' + spec if spec else ''}}}; only plain {{column}} "
                        "placeholders are accepted",
                    )
                ]
            )
        names.append(name)
    if not names:
        raise InvalidRequestError(
            [
                FieldProblem(
                    "prompt_template",
                    "has no {column} placeholder; with the same prompt for every item, send items instead",
                )
            ]
        )
    return names


def _seed(where: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidRequestError([FieldProblem(f"{where}.seed", f"{value!r} is not a whole number")]) from None


def _text(data: bytes, field: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InvalidRequestError([FieldProblem(field, f"is not UTF-8 text (byte {error.start})")]) from None
