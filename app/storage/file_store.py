"""The ``file`` backend: objects as files under one directory (a shared volume or NFS mount).

Keys are checked against ``diffq.app.storage.objects`` and resolved inside the root, so no name
can reach outside it. A write goes to a temporary file in the root's ``.tmp`` folder and is
renamed into place: a reader sees the whole object or none, and a write cut short leaves only
a temporary file, which the sweeper removes.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from diffq.app.storage import objects
from diffq.app.storage.base import ListedObject, StorageConfigError, StorageUnavailableError

TMP = ".tmp"


class FileResultStore:
    name = "file"

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def path(self, key: str) -> Path:
        """Where ``key`` lives; refuses anything that is not a diffq object key."""
        if not objects.is_valid(key):
            raise ValueError(f"not a diffq object key: {key!r}")
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"object key {key!r} leaves the store directory")
        return path

    def put(self, key: str, data: bytes, content_type: str, ttl: int) -> None:
        path = self.path(key)
        tmp = self.root / TMP / uuid.uuid4().hex
        try:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            raise StorageUnavailableError(f"cannot write {path}: {error}") from error

    def get(self, key: str) -> bytes | None:
        path = self.path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            if not self.root.is_dir():
                raise StorageUnavailableError(f"the store directory {self.root} is gone (unmounted?)") from None
            return None
        except OSError as error:
            raise StorageUnavailableError(f"cannot read {path}: {error}") from error

    def delete(self, names: Iterable[str]) -> None:
        for key in names:
            path = self.path(key)
            path.unlink(missing_ok=True)
            _remove_empty(path.parent, self.root)

    def delete_job(self, job_id: str) -> None:
        if objects.JOB_ID.match(job_id):
            shutil.rmtree(self.root / job_id, ignore_errors=True)

    def list(self) -> Iterator[ListedObject]:
        for folder, _, files in os.walk(self.root):
            for name in files:
                path = Path(folder) / name
                try:
                    modified = path.stat().st_mtime
                except FileNotFoundError:
                    continue
                yield ListedObject(key=path.relative_to(self.root).as_posix(), modified=modified)

    def remove_listed(self, key: str) -> None:
        """Remove a listed file that is not an object key (a cut-short write in ``.tmp``)."""
        path = (self.root / key).resolve()
        if path.is_relative_to(self.root) and path != self.root:
            path.unlink(missing_ok=True)
            _remove_empty(path.parent, self.root)

    def signed_url(self, key: str, seconds: int, content_type: str) -> str | None:
        return None

    def public_path(self, key: str) -> str:
        return key

    def ping(self) -> bool:
        return self.root.is_dir() and os.access(self.root, os.W_OK)

    def check(self) -> None:
        if not self.root.is_dir():
            raise StorageConfigError(
                f"DIFFQ_STORE_DIR: {self.root} is not a directory (create it, or mount the volume)"
            )
        probe = self.root / TMP / f"probe-{uuid.uuid4().hex}"
        try:
            probe.parent.mkdir(exist_ok=True)
            probe.write_bytes(b"diffq")
            probe.unlink()
        except OSError as error:
            raise StorageConfigError(f"DIFFQ_STORE_DIR: cannot write to {self.root}: {error}") from error


def _remove_empty(folder: Path, root: Path) -> None:
    """Remove ``folder`` and its parents up to ``root`` while they are empty."""
    while folder != root and folder.is_relative_to(root):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
