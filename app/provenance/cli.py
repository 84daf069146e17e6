"""``diffq verify FILE…``: what each image carries of C2PA credentials, the IPTC label, diffq's
parameters and the watermark. Exit status 0 when every file is labelled as generated (and, where
it carries a C2PA manifest, that manifest is valid), 1 otherwise, 2 when a file cannot be read."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from diffq.app.provenance.verify import NotAnImageError, verify
from diffq.app.settings import Settings, load_settings


def add_command(commands: Any) -> None:
    parser = commands.add_parser("verify", help="check images for content credentials, the AI label and watermark")
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="PNG, JPEG or WebP images")
    parser.add_argument("--payload", help="watermark payload to look for (default: DIFFQ_WATERMARK_PAYLOAD)")
    parser.add_argument("--json", action="store_true", help="one JSON report per line")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings | None = None) -> int:
    settings = settings if settings is not None else load_settings()
    text = args.payload if args.payload is not None else settings.watermark_payload
    payload = text.encode() if text else None
    worst = 0
    for path in args.files:
        try:
            report = verify(path.read_bytes(), payload)
        except (OSError, NotAnImageError) as error:
            print(f"diffq verify: {path}: {error}", file=sys.stderr)
            worst = 2
            continue
        if args.json:
            print(json.dumps({"name": str(path), **report}))
        else:
            print(_summary(path, report))
        if not _labelled(report):
            worst = max(worst, 1)
    return worst


def _labelled(report: dict[str, Any]) -> bool:
    c2pa = report["c2pa"]
    return bool(report["iptc"]["ai_generated"]) and (not c2pa["present"] or c2pa["valid"])


def _summary(path: Path, report: dict[str, Any]) -> str:
    c2pa, iptc, mark = report["c2pa"], report["iptc"], report["watermark"]
    if not c2pa["present"]:
        credentials = "none"
    elif c2pa["valid"]:
        signer = c2pa["signer"].get("common_name") or c2pa["signer"].get("issuer") or "unknown signer"
        trust = "trusted" if c2pa["trusted"] else "untrusted CA"
        credentials = f"valid, signed by {signer!r} ({trust}); {', '.join(a for a in c2pa['actions'] if a)}"
    else:
        credentials = f"INVALID ({', '.join(c2pa['failures'])})"
    if not mark["checked"]:
        watermark = f"not checked ({mark['reason']})"
    else:
        watermark = f"{'found' if mark['found'] else 'not found'} (bit accuracy {mark['bit_accuracy']:.0%})"
    parameters = report["parameters"] or {}
    lines = [
        f"{path}: {report['format']} {report['width']}×{report['height']}",
        f"  C2PA content credentials: {credentials}",
        f"  IPTC digital source type: {iptc['digital_source_type'] or 'none'}",
        "  diffq parameters: "
        f"{', '.join(f'{k}={parameters[k]}' for k in ('model', 'seed', 'steps') if k in parameters) or 'none'}",
        f"  watermark: {watermark}",
    ]
    return "\n".join(lines)
