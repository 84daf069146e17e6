"""Real S3-protocol servers for the storage tests, on free loopback ports.

- ``MotoServer``: moto's standalone server (PyPI ``moto[server]``, the ``test`` extra), a real
  HTTP server speaking S3, started as its own process. In memory: a restart loses objects,
  and it does not enforce presigned URLs' expiry.
- ``S3rverServer``: npm's ``s3rver`` (Node), which checks signatures and presigned expiry and
  keeps objects in a directory across restarts: for the expiry and outage tests. ``.ci/run``
  installs it into ``.cache/s3rver`` (best effort); without it those tests skip and say why.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import httpx
from botocore.config import Config

from diffq.app.embedded_redis import free_port
from tests.helpers import wait_for

REPO = Path(__file__).resolve().parent.parent
BUCKET = "diffq-test"
S3RVER = REPO / ".cache" / "s3rver" / "node_modules" / ".bin" / "s3rver"


class S3Server:
    """A started S3 server: its endpoint, the credentials it takes, and the environment a diffq
    process needs to use its bucket."""

    access_key = "test"
    secret_key = "test"

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        with (self.log_dir / f"{type(self).__name__}.log").open("ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        wait_for(self.answers, timeout=60, interval=0.1)

    def answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"the S3 server exited with {self.process.returncode}")
        try:
            httpx.get(self.endpoint, timeout=1)
            return True
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def client(self):  # noqa: ANN201 (boto3's client class is generated)
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key,
                            config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"))

    def create_bucket(self, name: str = BUCKET) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str = BUCKET) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def environment(self, bucket: str = BUCKET) -> dict[str, str]:
        """``DIFFQ_*`` and AWS variables for a diffq process using ``bucket`` here."""
        return {
            "DIFFQ_STORE": "s3", "DIFFQ_STORE_BUCKET": bucket, "DIFFQ_STORE_ENDPOINT_URL": self.endpoint,
            "DIFFQ_STORE_REGION": "us-east-1", "DIFFQ_STORE_ADDRESSING": "path",
            "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }


class MotoServer(S3Server):
    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]


def s3rver_path() -> str | None:
    """The s3rver executable: ``.cache/s3rver`` (``.ci/run`` installs it there), else ``PATH``."""
    if S3RVER.exists() and shutil.which("node"):
        return str(S3RVER)
    return shutil.which("s3rver")


class S3rverServer(S3Server):
    """s3rver's one account: access key and secret ``S3RVER``."""

    access_key = "S3RVER"
    secret_key = "S3RVER"

    def __init__(self, log_dir: Path) -> None:
        super().__init__(log_dir)
        self.data = log_dir / "s3rver-data"
        self.data.mkdir(exist_ok=True)

    def command(self) -> list[str]:
        path = s3rver_path()
        assert path is not None
        return [path, "-d", str(self.data), "-a", "127.0.0.1", "-p", str(self.port), "--silent",
                "--no-vhost-buckets", "--configure-bucket", BUCKET]

    def create_bucket(self, name: str = BUCKET) -> None:
        if name != BUCKET:
            super().create_bucket(name)


