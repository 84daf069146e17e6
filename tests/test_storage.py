"""The result store backends against real servers: a directory, moto's S3 server, and Redis;
the sweeper that leaves exactly the objects of live jobs; settings that cannot work refused
with the setting named; image URLs per mode."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from redis import Redis

from diffq.app.contract import keys
from diffq.app.contract.records import ImageRecord, JobParams, JobRecord
from diffq.app.main import create_app
from diffq.app.settings import Settings
from diffq.app.storage import objects
from diffq.app.storage.base import StorageConfigError
from diffq.app.storage.factory import check_settings, ready_store
from diffq.app.storage.file_store import FileResultStore
from diffq.app.storage.redis_store import RedisResultStore
from diffq.app.storage.s3_store import S3ResultStore
from diffq.app.storage.sweep import StoreSweeper, referenced
from diffq.app.storage.urls import image_links, relative_proxy_url
from tests.helpers import clean_environment, diffq_command, work
from tests.s3_servers import MotoServer

JOB = "a" * 32
TOKEN = "b" * 32
OTHER = "c" * 32


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bucket(moto: MotoServer, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket per test."""
    name = f"diffq-{abs(hash(request.node.name)) % 10**10}"
    client = moto.client()
    try:
        client.create_bucket(Bucket=name)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    for key in moto.keys(name):
        client.delete_object(Bucket=name, Key=key)
    return name


@pytest.fixture
def s3(moto: MotoServer, bucket: str, monkeypatch: pytest.MonkeyPatch) -> S3ResultStore:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto.secret_key)
    return S3ResultStore(bucket, "diffq/", moto.endpoint, "us-east-1", "path")


def _round_trip(store) -> None:  # noqa: ANN001 (any ResultStore)
    key = objects.image(JOB, TOKEN, 0, "png")
    assert store.get(key) is None
    store.put(key, b"\x89PNG bytes", "image/png", 60)
    store.put(objects.journey(JOB, TOKEN, 0), b"RIFF", "image/webp", 60)
    store.put(objects.image(OTHER, TOKEN, 0, "png"), b"other", "image/png", 60)
    assert store.get(key) == b"\x89PNG bytes"
    assert sorted(o.key for o in store.list()) == sorted(
        [key, objects.journey(JOB, TOKEN, 0), objects.image(OTHER, TOKEN, 0, "png")]
    )
    store.delete_job(JOB)
    assert [o.key for o in store.list()] == [objects.image(OTHER, TOKEN, 0, "png")]
    store.delete([objects.image(OTHER, TOKEN, 0, "png")])
    assert list(store.list()) == []


def test_s3_store_writes_reads_lists_and_deletes_a_jobs_objects(s3: S3ResultStore, moto: MotoServer,
                                                                bucket: str) -> None:
    _round_trip(s3)
    s3.put(objects.image(JOB, TOKEN, 1, "webp"), b"RIFFxxxxWEBP", "image/webp", 60)
    assert moto.keys(bucket) == [f"diffq/{JOB}/{TOKEN}/1.webp"]  # under the prefix
    head = moto.client().head_object(Bucket=bucket, Key=f"diffq/{JOB}/{TOKEN}/1.webp")
    assert head["ContentType"] == "image/webp"


def test_a_signed_url_is_fetched_by_a_plain_http_client_without_credentials(s3: S3ResultStore) -> None:
    key = objects.image(JOB, TOKEN, 0, "jpg")
    s3.put(key, b"\xff\xd8jpeg", "image/jpeg", 60)
    url = s3.signed_url(key, 60, "image/jpeg")
    assert url is not None and "X-Amz-Signature=" in url and "X-Amz-Expires=60" in url
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == b"\xff\xd8jpeg"
    assert response.headers["content-type"] == "image/jpeg"


def test_file_store_round_trips_under_its_directory(tmp_path: Path) -> None:
    _round_trip(FileResultStore(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp"]  # emptied folders go too


def test_redis_store_round_trips_with_the_jobs_ttl(redis: Redis) -> None:
    store = RedisResultStore(redis)
    _round_trip(store)
    store.put(objects.image(JOB, TOKEN, 0, "png"), b"x", "image/png", 60)
    assert 0 < redis.ttl(keys.stored_object(objects.image(JOB, TOKEN, 0, "png"))) <= 60


@pytest.mark.parametrize("key", [
    "../outside.png", f"{JOB}/../../outside.png", f"/{JOB}/{TOKEN}/0.png", f"{JOB}/{TOKEN}/0.png/../../../x",
    f"{JOB}/{TOKEN}/..%2F0.png", f"{JOB}/input/../../../etc/passwd", f"{JOB}/{TOKEN}/0.exe", f"{JOB}\\..\\x.png",
    f"{JOB}/{TOKEN}/0.png\x00.txt", "", f"{JOB.upper()}/{TOKEN}/0.png",
])
def test_file_store_refuses_any_key_that_is_not_a_diffq_object_key(tmp_path: Path, key: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    store = FileResultStore(root)
    with pytest.raises(ValueError):
        store.put(key, b"x", "image/png", 60)
    with pytest.raises(ValueError):
        store.get(key)
    with pytest.raises(ValueError):
        store.delete([key])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"] and list(root.rglob("*.png")) == []


def test_a_write_cut_short_is_never_visible_and_is_swept(tmp_path: Path, redis: Redis) -> None:
    store = FileResultStore(tmp_path)
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "0123").write_bytes(b"half a PNG")  # a worker killed mid-write leaves this
    assert list(store.list()) != [] and store.get(objects.image(JOB, TOKEN, 0, "png")) is None
    report = StoreSweeper(redis, store, Settings(_env_file=None, store_sweep_grace=0)).sweep(locked=False)
    assert report.removed == [".tmp/0123"] and list(store.list()) == []


def _record(job_id: str, status: str, token: str | None, image_keys: list[str]) -> JobRecord:
    params = JobParams(prompt="p", width=16, height=16, steps=2, guidance_scale=7.0, scheduler="ddim", seed=1)
    images = [ImageRecord(index=n, seed=1, width=16, height=16, sha256="0", size_bytes=1, key=key)
              for n, key in enumerate(image_keys)]
    return JobRecord(id=job_id, model="m", request=params, status=status, attempt_token=token, images=images)


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_the_sweep_leaves_exactly_the_objects_of_live_jobs(backend: str, tmp_path: Path, redis: Redis,
                                                           request: pytest.FixtureRequest) -> None:
    store = FileResultStore(tmp_path) if backend == "file" else request.getfixturevalue("s3")
    live, running, expired, stale = "1" * 32, "2" * 32, "3" * 32, "4" * 32
    kept = [objects.image(live, TOKEN, 0, "png"), objects.image(running, TOKEN, 0, "png")]
    gone = [
        objects.image(live, OTHER, 0, "png"),  # a stale attempt's upload: never referenced
        objects.image(expired, TOKEN, 0, "png"),  # its record has expired
        objects.job_input(expired, "image"),
        objects.image(stale, OTHER, 0, "png"),  # running under TOKEN; OTHER's run was replaced (killed mid-upload)
    ]
    for key in kept + gone:
        store.put(key, b"x", "image/png", 60)
    for record in (_record(live, "succeeded", None, [kept[0]]), _record(running, "running", TOKEN, []),
                   _record(stale, "running", TOKEN, [])):
        redis.hset(keys.job(record.id), mapping=record.to_hash())

    young = StoreSweeper(redis, store, Settings(_env_file=None, store_sweep_grace=3600)).sweep(locked=False)
    assert young.removed == []  # under the grace: perhaps a job still being submitted or finished
    report = StoreSweeper(redis, store, Settings(_env_file=None, store_sweep_grace=0)).sweep(locked=False)

    assert sorted(report.removed) == sorted(gone)
    assert sorted(o.key for o in store.list()) == sorted(kept)


def test_one_sweep_at_a_time_across_workers(tmp_path: Path, redis: Redis) -> None:
    store = FileResultStore(tmp_path)
    store.put(objects.image(JOB, TOKEN, 0, "png"), b"x", "image/png", 60)
    settings = Settings(_env_file=None, store_sweep_grace=0, store_sweep_interval=60)
    redis.set(keys.STORE_SWEEPER, "1", ex=60)  # another worker's sweep holds the lock
    assert StoreSweeper(redis, store, settings).sweep().removed == []
    redis.delete(keys.STORE_SWEEPER)
    assert StoreSweeper(redis, store, settings).sweep().removed == [objects.image(JOB, TOKEN, 0, "png")]


def test_referenced_names_images_journeys_and_inputs() -> None:
    record = _record(JOB, "succeeded", None, [objects.image(JOB, TOKEN, 0, "png")])
    record.images[0].journey_key = objects.journey(JOB, TOKEN, 0)
    assert referenced(record) == {objects.image(JOB, TOKEN, 0, "png"), objects.journey(JOB, TOKEN, 0)}


@pytest.mark.parametrize(("fields", "setting"), [
    ({"store": "file"}, "DIFFQ_STORE_DIR"),
    ({"store": "s3"}, "DIFFQ_STORE_BUCKET"),
    ({"image_urls": "signed"}, "DIFFQ_IMAGE_URLS"),
    ({"store": "file", "store_dir": "/tmp", "image_urls": "public"}, "DIFFQ_PUBLIC_BASE_URL"),
    ({"image_urls": "public", "public_base_url": "https://cdn.example"}, "DIFFQ_IMAGE_URLS"),
    ({"store": "s3", "store_bucket": "b", "store_prefix": "no-slash"}, "DIFFQ_STORE_PREFIX"),
])
def test_settings_that_cannot_work_are_refused_naming_the_setting(fields: dict, setting: str) -> None:
    with pytest.raises(StorageConfigError, match=setting):
        check_settings(Settings(_env_file=None, **fields))


def test_a_missing_bucket_or_directory_is_refused_at_start(moto: MotoServer, tmp_path: Path, redis: Redis,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto.secret_key)
    s3 = Settings(_env_file=None, store="s3", store_bucket="no-such-bucket", store_endpoint_url=moto.endpoint,
                  store_region="us-east-1", store_addressing="path")
    with pytest.raises(StorageConfigError, match="DIFFQ_STORE_BUCKET: bucket 'no-such-bucket' does not exist"):
        ready_store(s3, redis)
    with pytest.raises(StorageConfigError, match="DIFFQ_STORE_DIR"):
        ready_store(Settings(_env_file=None, store="file", store_dir=tmp_path / "missing"), redis)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    with pytest.raises(StorageConfigError, match="DIFFQ_STORE_DIR"):
        ready_store(Settings(_env_file=None, store="file", store_dir=a_file), redis)
    down = s3.model_copy(update={"store_endpoint_url": "http://127.0.0.1:9"})
    with pytest.raises(StorageConfigError, match="DIFFQ_STORE_ENDPOINT_URL"):
        ready_store(down, redis)


@pytest.mark.parametrize("command", ["api", "worker"])
def test_diffq_api_and_worker_refuse_to_start_with_a_store_they_cannot_write(
    command: str, tmp_path: Path, redis_server
) -> None:
    env = clean_environment(DIFFQ_REDIS_URL=redis_server.url, DIFFQ_STORE="file",
                            DIFFQ_STORE_DIR=str(tmp_path / "not-mounted"))
    done = subprocess.run([*diffq_command(), command], env=env, capture_output=True, timeout=120)
    assert done.returncode == 2
    assert b"DIFFQ_STORE_DIR" in done.stderr and b"not-mounted" in done.stderr


def test_a_store_down_at_read_time_is_a_503_with_retry_after(settings: Settings, tmp_path: Path, redis: Redis) -> None:
    root = tmp_path / "mounted"
    root.mkdir()
    job_id = "5" * 32
    key = objects.image(job_id, TOKEN, 0, "png")
    record = _record(job_id, "succeeded", None, [key])
    redis.hset(keys.job(job_id), mapping=record.to_hash())
    FileResultStore(root).put(key, b"\x89PNG", "image/png", 60)
    with TestClient(create_app(settings.model_copy(update={"store": "file", "store_dir": root}))) as client:
        assert client.get(f"/v1/jobs/{job_id}/images/0.png").content == b"\x89PNG"
        root.rename(tmp_path / "unmounted")  # the volume goes away under a running API
        response = client.get(f"/v1/jobs/{job_id}/images/0.png")
        assert response.status_code == 503 and response.headers["retry-after"]
        assert response.json()["code"] == "storage_unavailable"
        ready = client.get("/readyz").json()
        assert ready["store"] is False and ready["store_backend"] == "file"
        (tmp_path / "unmounted").rename(root)
        assert client.get(f"/v1/jobs/{job_id}/images/0.png").content == b"\x89PNG"  # nothing was lost


def test_urls_per_mode(tmp_path: Path, s3: S3ResultStore) -> None:
    key = objects.image(JOB, TOKEN, 0, "webp")
    record = _record(JOB, "succeeded", None, [key])
    image = record.images[0].model_copy(update={"extension": "webp", "content_type": "image/webp"})
    base = Settings(_env_file=None, store="s3", store_bucket="b")
    proxied = image_links(record, image, base, s3, relative_proxy_url)
    assert proxied.url == f"/v1/jobs/{JOB}/images/0.webp" and proxied.expires_at is None
    signed = image_links(record, image, base.model_copy(update={"image_urls": "signed", "signed_url_ttl": 90}), s3,
                         relative_proxy_url)
    assert "X-Amz-Expires=90" in signed.url and signed.expires_at is not None
    public = image_links(record, image, base.model_copy(update={"image_urls": "public",
                                                                "public_base_url": "https://cdn.example/i/"}),
                         s3, relative_proxy_url)
    assert public.url == f"https://cdn.example/i/diffq/{key}"
    legacy = image_links(record, image.model_copy(update={"key": None}), base.model_copy(update={"image_urls": "signed"}),
                         s3, relative_proxy_url)
    assert legacy.url == f"/v1/jobs/{JOB}/images/0.webp"  # stored before the result store: always proxied


@pytest.mark.usefixtures("served")
@pytest.mark.parametrize(("body", "field", "words"), [
    ({"quality": 80}, "quality", "webp or jpeg"),
    ({"output_format": "gif"}, "output_format", "png"),
    ({"output_format": "jpeg", "quality": 0}, "quality", "greater than or equal to 1"),
    ({"retention_seconds": 7 * 86400 + 1}, "retention_seconds", "604800"),
    ({"retention_seconds": 0}, "retention_seconds", "greater than or equal to 1"),
])
def test_bad_output_format_quality_or_retention_is_a_422_naming_the_field(client: TestClient, body: dict,
                                                                         field: str, words: str) -> None:
    response = client.post("/v1/jobs", json={"prompt": "a red circle", "steps": 2, **body})
    assert response.status_code == 422
    assert any(problem["field"] in (field, "body") and words in problem["message"]
               for problem in response.json()["fields"]), response.json()


@pytest.mark.usefixtures("served")
def test_retention_counts_from_the_end_and_expires_at_says_when(client: TestClient, redis: Redis,
                                                                settings: Settings, engine) -> None:  # noqa: ANN001
    job = client.post("/v1/jobs", json={"prompt": "a red circle", "steps": 2, "retention_seconds": 120}).json()
    assert job["request"]["retention_seconds"] == 120
    assert redis.ttl(keys.job(job["id"])) > 120  # waiting, it lives job_ttl: a long queue never loses it
    work(settings, engine)
    ended = client.get(f"/v1/jobs/{job['id']}").json()  # expires_at: from the record's own TTL
    assert ended["status"] == "succeeded" and 0 < redis.ttl(keys.job(job["id"])) <= 120
    assert timedelta(seconds=110) < datetime.fromisoformat(ended["expires_at"]) - datetime.now(timezone.utc) \
        <= timedelta(seconds=120)
    assert all(0 < redis.ttl(name) <= 120 + objects.OBJECT_TTL_MARGIN
               for name in redis.scan_iter(match=keys.stored_object(f"{job['id']}/*")))
