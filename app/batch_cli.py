"""``diffq batch``: submit a catalog batch with a progress bar, read its results, download its images.

    diffq batch submit products.csv --template "a {colour} mug, {bg} background" --steps 20
    diffq batch results <id> [-o results.jsonl]
    diffq batch download <id> -o images/        (a folder, resumable)  or  -o images.zip
    diffq batch status|cancel|delete <id>,  diffq batch list

A client of a running API through ``diffq.app.client`` (URL and key as for ``diffq generate``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import httpx

from diffq.app.client import APIError, Client
from diffq.app.client_cli import EXIT_FAILED, EXIT_INTERRUPTED, ApiAddress, _refused, _unreachable, api_url


def add_command(commands: Any, run: Any) -> None:
    """``diffq batch <action>``; ``run(args)`` dispatches to ``main``."""
    batch = commands.add_parser("batch", help="many jobs as one batch: submit a CSV/JSONL, follow it, get results")
    actions = batch.add_subparsers(dest="action", required=True, metavar="ACTION")
    submit = actions.add_parser(
        "submit", help="submit a JSONL file of jobs, or a CSV/JSON list of rows with --template"
    )
    submit.add_argument("file", type=Path, help="products.csv (with --template), jobs.jsonl, or rows.json")
    submit.add_argument("--template", help='prompt with {column} placeholders, e.g. "a {colour} mug, {bg} background"')
    submit.add_argument("--defaults", default="{}", help="JSON job fields for every item, e.g. '{\"steps\": 20}'")
    submit.add_argument("--steps", type=int, help="denoising steps of every item")
    submit.add_argument("--model", help="served model name")
    submit.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a shared input image, uploaded once; items use it as input:NAME (repeatable)",
    )
    submit.add_argument("--webhook", help="URL for the signed batch.completed webhook")
    submit.add_argument("--priority", choices=["high", "normal", "low"], help="default low")
    submit.add_argument("--idempotency-key", help="makes the submit safe to retry")
    submit.add_argument("--no-wait", action="store_true", help="print the batch id and return")
    submit.add_argument("--no-progress", action="store_true", help="no progress bar")
    for name, help_text in (
        ("status", "counts, progress and ETA"),
        ("cancel", "cancel every unended item"),
        ("delete", "delete the batch, its jobs and images"),
        ("results", "results.jsonl: custom_id, status, image URLs, seeds, error"),
        ("download", "the succeeded images: a folder (resumable) or a .zip"),
    ):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("batch_id")
        if name in ("results", "download"):
            action.add_argument(
                "-o",
                "--output",
                type=Path,
                required=name == "download",
                help="file (results) or folder / .zip (download)",
            )
    actions.add_parser("list", help="the API key's newest batches")
    for action in actions.choices.values():
        action.add_argument("--url", help="API base URL (default: DIFFQ_URL, else http://DIFFQ_HOST:DIFFQ_PORT)")
    batch.set_defaults(run=run)


def main(args: argparse.Namespace, settings: ApiAddress) -> int:
    with Client(api_url(args, settings)) as client:
        try:
            return ACTIONS[args.action](client, args)
        except APIError as error:
            return _refused(f"batch {args.action}", error)
        except httpx.TransportError as error:
            return _unreachable(client.base_url, error)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED


def _submit(client: Client, args: argparse.Namespace) -> int:
    defaults = json.loads(args.defaults)
    defaults.update({k: v for k, v in (("steps", args.steps), ("model", args.model)) if v is not None})
    inputs = {}
    for spec in args.input:
        name, sep, path = spec.partition("=")
        if not sep:
            raise SystemExit(f"diffq batch submit: --input takes NAME=PATH, not {spec!r}")
        inputs[name] = Path(path)
    batch = client.submit_batch(
        file=args.file,
        prompt_template=args.template,
        defaults=defaults or None,
        inputs=inputs or None,
        webhook={"url": args.webhook} if args.webhook else None,
        priority=args.priority,
        idempotency_key=args.idempotency_key,
    )
    print(f"diffq: batch {batch['id']} queued: {batch['counts']['total']} items", file=sys.stderr, flush=True)
    if args.no_wait:
        print(batch["id"])
        return 0
    batch = _follow(client, batch, not args.no_progress)
    print(batch["id"])
    return 0 if batch["counts"]["failed"] == 0 and batch["status"] == "completed" else EXIT_FAILED


def _follow(client: Client, batch: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Poll the batch to its end, with a tqdm bar over its items."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=batch["counts"]["total"], unit="item", desc="batch", file=sys.stderr, dynamic_ncols=True)

    def show(current: dict[str, Any]) -> None:
        if bar is not None:
            counts = current["counts"]
            bar.n = counts["succeeded"] + counts["failed"] + counts["canceled"]
            bar.set_postfix(failed=counts["failed"], running=counts["running"], refresh=False)
            bar.refresh()

    try:
        return client.wait_batch(batch["id"], on_progress=show)
    finally:
        if bar is not None:
            bar.close()


def _status(client: Client, args: argparse.Namespace) -> int:
    print(json.dumps(client.batch(args.batch_id), indent=2))
    return 0


def _cancel(client: Client, args: argparse.Namespace) -> int:
    batch = client.cancel_batch(args.batch_id)
    print(f"batch {batch['id']} {batch['status']}: {json.dumps(batch['counts'])}")
    return 0


def _delete(client: Client, args: argparse.Namespace) -> int:
    client.delete_batch(args.batch_id)
    print(f"batch {args.batch_id} deleted")
    return 0


def _results(client: Client, args: argparse.Namespace) -> int:
    out = args.output.open("w") if args.output else sys.stdout
    try:
        for line in client.batch_results(args.batch_id):
            out.write(json.dumps(line) + "\n")
    finally:
        if args.output:
            out.close()
    return 0


def _download(client: Client, args: argparse.Namespace) -> int:
    paths = client.download_batch(args.batch_id, args.output)
    print(f"{len(paths)} file(s) in {args.output}", file=sys.stderr)
    return 0 if paths else EXIT_FAILED


def _list(client: Client, args: argparse.Namespace) -> int:
    print(f"{'ID':32}  {'STATUS':11}  {'DONE':>11}  {'FAILED':>6}  MODEL")
    for batch in client.batches():
        counts = batch["counts"]
        done = f"{counts['succeeded'] + counts['failed'] + counts['canceled']}/{counts['total']}"
        print(f"{batch['id']:32}  {batch['status']:11}  {done:>11}  {counts['failed']:>6}  {batch['model']}")
    return 0


ACTIONS = {
    "submit": _submit,
    "status": _status,
    "cancel": _cancel,
    "delete": _delete,
    "results": _results,
    "download": _download,
    "list": _list,
}
