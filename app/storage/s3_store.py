"""The ``s3`` backend: any S3-compatible object store (AWS S3, Cloudflare R2, GCS's S3
interface, MinIO, Ceph RGW) through boto3, which also signs GET URLs.

Credentials come from boto3's usual chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE`` and the AWS config files, container and instance roles); diffq never reads,
stores or logs them. Objects live under ``DIFFQ_STORE_PREFIX`` in ``DIFFQ_STORE_BUCKET``.
A ``PutObject`` is atomic: readers see the whole object or none.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config

from diffq.app.storage.base import ListedObject, StorageConfigError, StorageUnavailableError

#: Errors that mean "the store is not answering now": retried by the worker, 503 to a reader.
_DOWN = (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)
_MISSING = {"NoSuchKey", "404", "NotFound"}
_CREDENTIALS = "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or the instance role)"


class S3ResultStore:
    name = "s3"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing: str = "auto",
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        config = Config(
            connect_timeout=2,
            read_timeout=10,
            retries={"mode": "standard", "max_attempts": 2},
            # boto3's stubs want a literal style; botocore itself refuses an unknown one.
            s3={"addressing_style": addressing},  # type: ignore[arg-type]
            signature_version="s3v4",
        )
        self.client: Any = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url or None, region_name=region or None, config=config
        )

    def put(self, key: str, data: bytes, content_type: str, ttl: int) -> None:
        self._call("put_object", Bucket=self.bucket, Key=self.prefix + key, Body=data, ContentType=content_type)

    def get(self, key: str) -> bytes | None:
        try:
            reply = self._call("get_object", Bucket=self.bucket, Key=self.prefix + key)
            return reply["Body"].read()
        except botocore.exceptions.ClientError as error:
            if _code(error) in _MISSING:
                return None
            raise StorageUnavailableError(f"S3 GetObject refused: {_code(error)}") from error
        except _DOWN as error:
            raise StorageUnavailableError(f"S3 unreachable: {error}") from error

    def delete(self, keys: Iterable[str]) -> None:
        names = [self.prefix + key for key in keys]
        for start in range(0, len(names), 1000):  # DeleteObjects takes at most 1000 keys
            chunk = [{"Key": name} for name in names[start : start + 1000]]
            self._call("delete_objects", Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True})

    def delete_job(self, job_id: str) -> None:
        self.delete(listed.key for listed in self._listing(f"{job_id}/"))

    def list(self) -> Iterator[ListedObject]:
        return self._listing("")

    def _listing(self, under: str) -> Iterator[ListedObject]:
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            pages = paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + under)
            for page in pages:
                for item in page.get("Contents", []):
                    key = item["Key"][len(self.prefix) :]
                    yield ListedObject(key=key, modified=item["LastModified"].timestamp())
        except _DOWN as error:
            raise StorageUnavailableError(f"S3 unreachable: {error}") from error

    def signed_url(self, key: str, seconds: int, content_type: str) -> str | None:
        # Signing is local (no request to the store): it works even while the store is down.
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.prefix + key}, ExpiresIn=seconds
        )

    def public_path(self, key: str) -> str:
        return self.prefix + key

    def ping(self) -> bool:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return True
        except (*_DOWN, botocore.exceptions.ClientError):
            return False

    def check(self) -> None:
        probe = f"{self.prefix}.diffq-probe-{uuid.uuid4().hex}"
        try:
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"diffq")
            self.client.delete_object(Bucket=self.bucket, Key=probe)
        except botocore.exceptions.NoCredentialsError as error:
            raise StorageConfigError(f"no S3 credentials found: set {_CREDENTIALS}") from error
        except botocore.exceptions.ClientError as error:
            code = _code(error)
            if code == "NoSuchBucket":
                raise StorageConfigError(f"DIFFQ_STORE_BUCKET: bucket {self.bucket!r} does not exist") from error
            if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"}:
                raise StorageConfigError(
                    f"S3 refused a test write to bucket {self.bucket!r} ({code}): check {_CREDENTIALS} and the "
                    "bucket policy (DIFFQ_STORE_BUCKET)"
                ) from error
            raise StorageConfigError(
                f"S3 refused a test write to DIFFQ_STORE_BUCKET={self.bucket!r}: {code}"
            ) from error
        except _DOWN as error:
            raise StorageConfigError(f"DIFFQ_STORE_ENDPOINT_URL: cannot reach the S3 store: {error}") from error

    def _call(self, operation: str, **arguments: Any) -> Any:
        try:
            return getattr(self.client, operation)(**arguments)
        except _DOWN as error:
            raise StorageUnavailableError(f"S3 unreachable: {error}") from error
        except botocore.exceptions.ClientError as error:
            if operation == "get_object":
                raise
            raise StorageUnavailableError(f"S3 {operation} refused: {_code(error)}") from error


def _code(error: botocore.exceptions.ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))
