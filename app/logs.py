"""Logging for every diffq process: one JSON object per line (or plain text), the job id on each line about a job.

``setup(settings)`` is called once by each entry point (``diffq api``, ``worker``, ``webhooks``,
``up`` and the client commands). ``DIFFQ_LOG_FORMAT`` picks ``json``, ``text``, or ``auto`` (json
unless stderr is a terminal). A JSON line::

    {"time": "2025-01-01T12:00:00.123Z", "level": "info", "logger": "diffq.worker.runner",
     "message": "job 3f0c…: succeeded with 1 image(s)", "job_id": "3f0c…", "process": 4242}

``job_id`` comes, in this order, from ``extra={"job_id": ...}`` on the call, from a job id (32 hex
digits) written in the message itself (``job <id>``, ``/v1/jobs/<id>``, RQ's ``(<id>)``), so lines of
code that knows nothing of this module carry it, or from ``job_context`` (a contextvar: everything
logged inside ``with job_context(job_id):``, also in threads started by ``run_in_threadpool``). Other ``extra`` fields
are written as they are; an exception as
``exception`` (its traceback text). uvicorn's access lines also get ``method``, ``path`` and ``status``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any

job_id_var: ContextVar[str | None] = ContextVar("diffq_job_id", default=None)
"""The job the current code works on, if any."""

JOB_ID = re.compile(r"(?<![0-9a-fA-F])([0-9a-f]{32})(?![0-9a-fA-F])")
ANSI = re.compile(r"\x1b\[[0-9;]*m")

#: Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
_HANDLER_MARK = "_diffq_handler"
#: Record attributes not written as extras: uvicorn's ANSI-coloured copy of its message; job_id (written above).
_SKIPPED = frozenset({"color_message", "job_id"})


@contextmanager
def job_context(job_id: str | None) -> Iterator[None]:
    """Attach ``job_id`` to every line logged inside the block (this task or thread)."""
    token = job_id_var.set(job_id)
    try:
        yield
    finally:
        job_id_var.reset(token)


class JobIdFilter(logging.Filter):
    """Sets ``record.job_id``: from ``extra``, else a job id in the message (a line that names a job is
    about that job, also inside another job's context, as in a worker's batch), else the context; or None."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            try:
                found = JOB_ID.search(record.getMessage())
            except Exception:  # a bad format string: logging reports it itself later
                found = None
            record.job_id = found.group(1) if found else job_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        message = ANSI.sub("", record.getMessage())
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
            + f"{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        job_id = getattr(record, "job_id", None)
        if job_id is not None:
            line["job_id"] = job_id
        line["process"] = record.process
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            _, method, path, _, status = record.args
            line.update(method=method, path=path, status=status)
        for name, value in vars(record).items():
            if name not in _STANDARD and name not in _SKIPPED and name not in line and not name.startswith("_"):
                line[name] = value if isinstance(value, str | int | float | bool | type(None)) else repr(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message [job=<id>]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        job_id = getattr(record, "job_id", None)
        if job_id is not None and job_id not in record.getMessage():
            text += f" [job={job_id}]"
        return text


def resolve_format(format: str, stream: IO[str]) -> str:
    """``json`` or ``text``; ``auto`` is text on a terminal, json otherwise."""
    if format != "auto":
        return format
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


def setup(
    settings: Any | None = None, *, format: str | None = None, level: str | None = None, stream: IO[str] | None = None
) -> logging.Handler:
    """Send the root logger's lines to ``stream`` (stderr) as ``format``, at ``level``; both default
    to the settings' ``log_format`` and ``log_level``. Replaces a handler an earlier call installed,
    so calling it again (tests, a CLI command in a process) does not double lines. uvicorn's loggers
    are routed through it too (their own handlers removed)."""
    stream = stream if stream is not None else sys.stderr
    format = format or (getattr(settings, "log_format", None) or os.environ.get("DIFFQ_LOG_FORMAT", "auto"))
    level = level or (getattr(settings, "log_level", None) or os.environ.get("DIFFQ_LOG_LEVEL", "info"))
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if resolve_format(format, stream) == "json" else TextFormatter())
    handler.addFilter(JobIdFilter())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    return handler


JOB_PATH = re.compile(r"^/v1/jobs/([0-9a-f]{32})(?:/|$)")


class JobContextMiddleware:
    """ASGI middleware: a request under ``/v1/jobs/<id>`` runs inside ``job_context(id)``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        found = JOB_PATH.match(scope.get("path", "")) if scope["type"] == "http" else None
        if found is None:
            await self.app(scope, receive, send)
            return
        with job_context(found.group(1)):
            await self.app(scope, receive, send)
