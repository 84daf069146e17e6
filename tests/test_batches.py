"""POST /v1/batches and the batch resource: the real API app on the test Redis, the tiny model
registered as a live worker would, and (where items must run) a real diffq worker in this
process (``tests.helpers.work``). Real processes: tests/test_batches_live.py."""

from __future__ import annotations

import io
import json
import time
import zipfile
from datetime import datetime

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer

from diffq.app.auth.apikeys import KeyLimits, KeyStore
from diffq.app.contract import keys
from diffq.app.contract.records import ModelRecord
from diffq.app.contract.tasks import TASK, Place, enqueue, enqueue_many, model_queue
from diffq.app.main import create_app
from diffq.app.settings import Settings
from tests.helpers import TINY_JOB, work

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def queue_ids(redis: Redis, model: ModelRecord) -> list[str]:
    return [i.decode() for i in redis.lrange(model_queue(model.name, redis).key, 0, -1)]


def submit(client: TestClient, body: object, **kwargs: object) -> dict:
    response = client.post("/v1/batches", json=body, **kwargs)
    assert response.status_code == 202, response.text
    return response.json()


def test_a_jsonl_batch_with_one_bad_line_is_refused_whole_naming_the_line(
    client: TestClient, served: ModelRecord, redis: Redis
) -> None:
    lines = [json.dumps({"custom_id": f"p{n}", **TINY_JOB}) for n in range(5)]
    lines[3] = json.dumps({"custom_id": "p3", **TINY_JOB, "steps": "many"})

    response = client.post("/v1/batches", content="\n".join(lines) + "\n", headers={"content-type": "application/jsonl"})

    assert response.status_code == 422, response.text
    assert [f["field"] for f in response.json()["fields"]] == ["line 4.steps"]
    assert "valid integer" in response.json()["fields"][0]["message"]
    assert queue_ids(redis, served) == [] and not redis.keys("diffq:job:*") and not redis.keys("diffq:batch:*")


def test_an_item_the_model_refuses_is_named_by_its_index_with_what_is_accepted(
    client: TestClient, served: ModelRecord, redis: Redis
) -> None:
    items = [dict(TINY_JOB), {**TINY_JOB, "width": served.max_size * 4}]

    response = client.post("/v1/batches", json={"items": items})

    assert response.status_code == 422, response.text
    [problem] = response.json()["fields"]
    assert problem["field"] == "items[1].width" and str(served.max_size) in problem["message"]
    assert queue_ids(redis, served) == []


def test_each_item_is_the_record_a_single_post_of_it_makes(
    client: TestClient, served: ModelRecord, redis: Redis
) -> None:
    # Items after the first that differ from it only in prompt and seed are made from its record
    # (JobService.build_like) and written with its fields sent once (JobStore.create_many).
    single = {**TINY_JOB, "prompt": "a blue square", "seed": 11, "guidance_scale": 3.5}
    items = [{**single, "prompt": "a red circle", "seed": 10}, single, *[{**single, "seed": None}] * 2]
    job_id = client.post("/v1/jobs", json=single).json()["id"]

    batch = submit(client, {"items": items})

    ids = [i.decode() for i in redis.lrange(keys.batch_items(batch["id"]), 0, -1)]
    fields = [{k.decode(): json.loads(v) for k, v in redis.hgetall(keys.job(i)).items()} for i in [job_id, *ids]]
    own = {"id", "created_at", "batch"}
    assert {k: v for k, v in fields[0].items() if k not in own} == {k: v for k, v in fields[2].items() if k not in own}
    assert [f["batch"]["index"] for f in fields[1:]] == [0, 1, 2, 3] and fields[1]["batch"]["id"] == batch["id"]
    assert [f["request"]["prompt"] for f in fields[1:]] == ["a red circle", *["a blue square"] * 3]
    seeds = [f["request"]["seed"] for f in fields[1:]]
    assert seeds[:2] == [10, 11] and len(set(seeds)) == 4  # an item without a seed gets its own


def test_a_lora_tag_in_a_later_item_is_judged_as_in_a_single_job(client: TestClient, served: ModelRecord) -> None:
    items = [dict(TINY_JOB), {**TINY_JOB, "prompt": "a red circle <lora:nowhere:0.5>"}]

    response = client.post("/v1/batches", json={"items": items})

    assert response.status_code == 422, response.text
    [problem] = response.json()["fields"]
    assert problem["field"] == "items[1].prompt" and "unknown adapter 'nowhere'" in problem["message"]


def test_custom_ids_must_be_unique_and_file_name_safe(client: TestClient, served: ModelRecord) -> None:
    items = [{**TINY_JOB, "custom_id": "a"}, {**TINY_JOB, "custom_id": "a"}, {**TINY_JOB, "custom_id": "../x"}]

    response = client.post("/v1/batches", json=items)  # a bare JSON list is a batch too

    assert response.status_code == 422
    fields = {f["field"]: f["message"] for f in response.json()["fields"]}
    assert "items[1].custom_id" in fields and "items[2].custom_id" in fields
    assert "A-Z a-z 0-9" in fields["items[2].custom_id"]


def test_a_template_fills_each_rows_placeholders_and_a_missing_column_is_named(
    client: TestClient, served: ModelRecord, redis: Redis
) -> None:
    rows = [{"custom_id": "sku-1", "colour": "red", "bg": "blue"}, {"custom_id": "sku-2", "colour": "green", "bg": "white"}]
    body = {"prompt_template": "a {colour} circle, {bg} background", "rows": rows, "defaults": {"steps": 2}}

    batch = submit(client, body)

    items = client.get(f"/v1/batches/{batch['id']}/items").json()["items"]
    assert [i["custom_id"] for i in items] == ["sku-1", "sku-2"]
    prompts = [client.get(f"/v1/jobs/{i['job_id']}").json()["request"]["prompt"] for i in items]
    assert prompts == ["a red circle, blue background", "a green circle, white background"]

    missing = client.post("/v1/batches", json={**body, "rows": [*rows, {"colour": "red"}]})
    assert missing.status_code == 422
    assert missing.json()["fields"][0]["field"] == "rows[2]" and "bg" in missing.json()["fields"][0]["message"]


def test_a_csv_upload_with_a_template_queues_one_job_per_row(
    client: TestClient, served: ModelRecord, redis: Redis
) -> None:
    csv = "custom_id,colour\nmug,red\nhat,blue\n"
    response = client.post("/v1/batches", data={"prompt_template": "a {colour} circle", "defaults": '{"steps": 2}'},
                           files={"file": ("products.csv", csv.encode(), "text/csv")})

    assert response.status_code == 202, response.text
    assert response.json()["counts"] == {"total": 2, "queued": 2, "running": 0, "succeeded": 0, "failed": 0,
                                         "canceled": 0}
    assert len(queue_ids(redis, served)) == 2


def test_ten_thousand_items_are_accepted_in_one_request(
    client: TestClient, served: ModelRecord, redis: Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    items = [{"custom_id": f"p{n}", "prompt": f"a red circle {n}", "steps": 2, "seed": n} for n in range(10_000)]

    started = time.perf_counter()
    batch = submit(client, {"items": items})
    took = time.perf_counter() - started

    with capsys.disabled():
        print(f"\n10,000-item batch accepted in {took:.2f} s (in-process client, loaded machine)")
    assert batch["counts"]["total"] == batch["counts"]["queued"] == 10_000
    ids = queue_ids(redis, served)
    assert len(ids) == 10_000 and redis.llen(keys.batch_items(batch["id"])) == 10_000
    job = Job.fetch(ids[-1], connection=redis, serializer=JSONSerializer)
    assert job.func_name == TASK and job.args == [ids[-1]] and job.get_status() == "queued"
    record = client.get(f"/v1/jobs/{ids[-1]}").json()
    assert record["status"] == "queued" and record["request"]["prompt"] == "a red circle 9999"
    assert took < 30  # the figure is bench/batches.py's; this only catches a round trip per job


def test_bulk_enqueued_rq_jobs_are_the_ones_rq_enqueues_itself(redis: Redis, settings: Settings) -> None:
    queue = model_queue("m", redis, Place("owner", 1, 60))
    with redis.pipeline() as pipe:
        enqueue(queue, "a" * 32, settings, pipeline=pipe)
        enqueue_many(queue, ["b" * 32], settings, pipeline=pipe)
        pipe.execute()

    by_rq, bulk = (redis.hgetall(f"rq:job:{c * 32}") for c in "ab")
    moment = {b"created_at", b"enqueued_at", b"data", b"description"}
    assert {k: v for k, v in by_rq.items() if k not in moment} == {k: v for k, v in bulk.items() if k not in moment}
    job = Job.fetch("b" * 32, connection=redis, serializer=JSONSerializer)
    assert (job.func_name, job.args, job.description) == (TASK, ["b" * 32], f"diffq job {'b' * 32}")
    assert redis.ttl("rq:job:" + "b" * 32) == redis.ttl("rq:job:" + "a" * 32) > 0


def test_bulk_enqueued_jobs_take_the_places_one_at_a_time_pushes_give_them(redis: Redis, settings: Settings) -> None:
    # Key b has jobs in rounds 0 to 3, one of them since taken by a worker (still in the fair zset);
    # key a then queues 6 jobs: in bulk on one queue, one at a time (FairQueue) on another.
    found = {}
    for model in ("bulk", "single"):
        other, own = (model_queue(model, redis, Place(owner, 2, 60)) for owner in ("b", "a"))
        for n in range(4):
            redis.hset(keys.job(f"{model}-b{n}"), "status", '"queued"')
            other.push_job_id(f"{model}-b{n}")
        redis.lrem(other.key, 1, f"{model}-b2")
        redis.hset(keys.job(f"{model}-b2"), "status", '"running"')
        ids = [f"{model}-a{n}" for n in range(6)]
        for job_id in ids:
            redis.hset(keys.job(job_id), "status", '"queued"')
        if model == "bulk":
            with redis.pipeline() as pipe:
                enqueue_many(own, ids, settings, pipeline=pipe)
                pipe.execute()
        else:
            for job_id in ids:
                own.push_job_id(job_id)
        fair = redis.zrange(keys.fair(own.name), 0, -1, withscores=True)
        found[model] = (
            [i.decode().split("-")[1] for i in redis.lrange(own.key, 0, -1)],
            [(i.decode().split("-")[1], score) for i, score in fair],
            redis.hgetall(keys.fair_state(own.name)),
        )

    assert found["bulk"] == found["single"]
    assert found["bulk"][0] == ["b0", "a0", "b1", "a1", "a2", "b3", "a3", "a4", "a5"]


def test_the_same_idempotency_key_gets_the_same_batch(client: TestClient, served: ModelRecord, redis: Redis) -> None:
    body = {"items": [dict(TINY_JOB)] * 3}
    first = client.post("/v1/batches", json=body, headers={"Idempotency-Key": "catalog-1"})
    again = client.post("/v1/batches", json=body, headers={"Idempotency-Key": "catalog-1"})
    other = client.post("/v1/batches", json={"items": [dict(TINY_JOB)]}, headers={"Idempotency-Key": "catalog-1"})

    assert first.status_code == again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert first.json()["id"] == again.json()["id"] and len(queue_ids(redis, served)) == 3
    assert other.status_code == 409


def test_a_batch_runs_below_its_keys_single_jobs(client: TestClient, served: ModelRecord, redis: Redis) -> None:
    batch = submit(client, {"items": [dict(TINY_JOB)] * 5})
    single = client.post("/v1/jobs", json=TINY_JOB).json()["id"]

    assert batch["priority"] == "low"
    assert queue_ids(redis, served)[0] == single  # normal priority: ahead of the whole low batch


def test_another_keys_job_waits_behind_at_most_one_item_of_a_big_batch(
    settings: Settings, served: ModelRecord, redis: Redis
) -> None:
    store = KeyStore(redis)
    a, b = ({"Authorization": f"Bearer {store.create(name, KeyLimits(priority='low'))[1]}"} for name in ("a", "b"))
    with TestClient(create_app(settings.model_copy(update={"auth": "keys"}))) as client:
        submit(client, {"items": [{**TINY_JOB, "seed": n} for n in range(200)]}, headers=a)
        single = client.post("/v1/jobs", json=TINY_JOB, headers=b).json()["id"]

    assert queue_ids(redis, served).index(single) <= 1


def test_cancel_ends_queued_items_at_once_and_takes_them_off_the_queue(
    client: TestClient, served: ModelRecord, redis: Redis
) -> None:
    batch = submit(client, {"items": [dict(TINY_JOB)] * 4})

    canceled = client.post(f"/v1/batches/{batch['id']}/cancel").json()

    assert canceled["status"] == "canceled" and canceled["counts"]["canceled"] == 4 and canceled["progress"] == 1
    assert queue_ids(redis, served) == []
    items = client.get(f"/v1/batches/{batch['id']}/items").json()["items"]
    assert {client.get(f"/v1/jobs/{i['job_id']}").json()["status"] for i in items} == {"canceled"}


def test_a_finished_batch_zips_exactly_its_succeeded_items_named_by_custom_id(
    client: TestClient, served: ModelRecord, settings: Settings, engine
) -> None:
    items = [{**TINY_JOB, "custom_id": name, "seed": n} for n, name in enumerate(["mug", "hat", "sock"])]
    batch = submit(client, {"items": items})
    [_, hat, _] = client.get(f"/v1/batches/{batch['id']}/items").json()["items"]
    assert client.post(f"/v1/jobs/{hat['job_id']}/cancel").json()["status"] == "canceled"

    work(settings, engine)

    done = client.get(f"/v1/batches/{batch['id']}").json()
    assert done["status"] == "completed" and done["completed_at"] is not None
    assert done["counts"] == {"total": 3, "queued": 0, "running": 0, "succeeded": 2, "failed": 0, "canceled": 1}
    lines = [json.loads(line) for line in client.get(f"/v1/batches/{batch['id']}/results.jsonl").text.splitlines()]
    assert [(r["custom_id"], r["status"], len(r["images"])) for r in lines] == [
        ("mug", "succeeded", 1), ("hat", "canceled", 0), ("sock", "succeeded", 1)]
    archive = zipfile.ZipFile(io.BytesIO(client.get(f"/v1/batches/{batch['id']}/images.zip").content))
    assert sorted(archive.namelist()) == ["mug.png", "sock.png"]
    image = client.get(lines[0]["images"][0]).content
    assert archive.read("mug.png") == image


def test_delete_removes_the_batch_and_its_jobs(client: TestClient, served: ModelRecord, redis: Redis) -> None:
    batch = submit(client, {"items": [dict(TINY_JOB)] * 3})
    ids = [i["job_id"] for i in client.get(f"/v1/batches/{batch['id']}/items").json()["items"]]

    assert client.delete(f"/v1/batches/{batch['id']}").status_code == 204

    assert client.get(f"/v1/batches/{batch['id']}").status_code == 404
    assert all(client.get(f"/v1/jobs/{job_id}").status_code == 404 for job_id in ids)
    assert queue_ids(redis, served) == [] and client.get("/v1/batches").status_code in (200, 403)


def test_a_batch_lives_as_long_as_its_items(client: TestClient, served: ModelRecord, redis: Redis) -> None:
    batch = submit(client, {"items": [dict(TINY_JOB)], "defaults": {"retention_seconds": 3 * 86400}})
    job_id = client.get(f"/v1/batches/{batch['id']}/items").json()["items"][0]["job_id"]

    assert abs(redis.ttl(keys.batch(batch["id"])) - redis.ttl(keys.job(job_id))) <= 1
    assert redis.ttl(keys.batch_items(batch["id"])) > 2 * 86400


def test_a_shared_input_is_uploaded_once_and_used_by_every_item(
    client: TestClient, served: ModelRecord, settings: Settings, engine
) -> None:
    from PIL import Image

    product = Image.new("RGBA", (served.default_width, served.default_height), (200, 30, 30, 255))
    product.paste((0, 0, 0, 0), (0, 0, served.default_width // 2, served.default_height))  # transparent half
    png = io.BytesIO()
    product.save(png, format="PNG")
    lines = [json.dumps({"custom_id": f"bg-{c}", "prompt": f"a {c} background", "image": "input:product",
                         "mask": "alpha", "steps": 2}) for c in ("blue", "green")]

    response = client.post("/v1/batches", files={"file": ("items.jsonl", "\n".join(lines).encode()),
                                                 "product": ("product.png", png.getvalue(), "image/png")})

    assert response.status_code == 202, response.text
    batch_id = response.json()["id"]
    jobs = [client.get(f"/v1/jobs/{i['job_id']}").json() for i in
            client.get(f"/v1/batches/{batch_id}/items").json()["items"]]
    assert [job["request"]["mode"] for job in jobs] == ["inpaint", "inpaint"]
    assert jobs[0]["request"]["image"]["sha256"] == jobs[1]["request"]["image"]["sha256"]
    assert jobs[0]["request"]["mask"]["source"] == "alpha"
    work(settings, engine)
    assert client.get(f"/v1/batches/{batch_id}").json()["counts"]["succeeded"] == 2

    unknown = client.post("/v1/batches", json={"items": [{"prompt": "x", "image": "input:nope"}]})
    assert unknown.status_code == 422 and unknown.json()["fields"][0]["field"] == "items[0].image"


def test_items_with_a_deadline_go_in_the_models_deadline_index_as_a_single_job_does(
    client: TestClient, served: ModelRecord, redis: Redis
) -> None:
    items = [{**TINY_JOB, "deadline_seconds": 60}, dict(TINY_JOB), {**TINY_JOB, "deadline_seconds": 120}]
    batch = submit(client, {"items": items})
    ids = [i.decode() for i in redis.lrange(keys.batch_items(batch["id"]), 0, -1)]
    index = dict(redis.zrange(keys.deadlines(served.name), 0, -1, withscores=True))
    assert sorted(i.decode() for i in index) == sorted([ids[0], ids[2]])
    for job_id in (ids[0], ids[2]):
        deadline = json.loads(redis.hget(keys.job(job_id), "request"))["deadline_at"]
        assert abs(index[job_id.encode()] - datetime.fromisoformat(deadline).timestamp()) < 1e-3
    assert redis.ttl(keys.deadlines(served.name)) > 0
