"""The result store a process opens from its settings, checked before the process serves.

An API or worker that cannot write to its store refuses to start (``StorageConfigError``,
naming the setting to fix) rather than fail every job later.
"""

from __future__ import annotations

from redis import Redis

from diffq.app.settings import Settings
from diffq.app.storage.base import ResultStore, StorageConfigError


def open_store(settings: Settings, redis: Redis) -> ResultStore:
    """The configured backend (not yet checked: see ``check_settings`` and ``ResultStore.check``)."""
    check_settings(settings)
    if settings.store == "file":
        from diffq.app.storage.file_store import FileResultStore

        assert settings.store_dir is not None
        return FileResultStore(settings.store_dir)
    if settings.store == "s3":
        from diffq.app.storage.s3_store import S3ResultStore

        assert settings.store_bucket is not None
        return S3ResultStore(
            settings.store_bucket,
            settings.store_prefix,
            settings.store_endpoint_url,
            settings.store_region,
            settings.store_addressing,
        )
    from diffq.app.storage.redis_store import RedisResultStore

    return RedisResultStore(redis)


def check_settings(settings: Settings) -> None:
    """Settings that cannot work together; raises ``StorageConfigError`` naming them."""
    if settings.store == "file" and settings.store_dir is None:
        raise StorageConfigError("DIFFQ_STORE_DIR must name a directory when DIFFQ_STORE=file")
    if settings.store == "s3" and not settings.store_bucket:
        raise StorageConfigError("DIFFQ_STORE_BUCKET must name a bucket when DIFFQ_STORE=s3")
    if settings.image_urls == "signed" and settings.store != "s3":
        raise StorageConfigError(
            f"DIFFQ_IMAGE_URLS=signed needs DIFFQ_STORE=s3 (got DIFFQ_STORE={settings.store}); use proxy or public"
        )
    if settings.image_urls == "public" and not settings.public_base_url:
        raise StorageConfigError("DIFFQ_PUBLIC_BASE_URL must be set when DIFFQ_IMAGE_URLS=public")
    if settings.image_urls == "public" and settings.store == "redis":
        raise StorageConfigError("DIFFQ_IMAGE_URLS=public needs DIFFQ_STORE=file or s3 (Redis serves no URLs)")
    if settings.store_prefix and not settings.store_prefix.endswith("/"):
        raise StorageConfigError(f"DIFFQ_STORE_PREFIX must end with '/' (got {settings.store_prefix!r})")


def ready_store(settings: Settings, redis: Redis) -> ResultStore:
    """``open_store``, then a probe write: what a starting API or worker calls."""
    store = open_store(settings, redis)
    store.check()
    return store
