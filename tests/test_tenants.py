"""API keys and tenants: auth, isolation, per-key rate, queued-job cap, priority, fair share,
job budget and metadata, against the real API app and a real Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from diffq.app.auth.apikeys import KeyLimits, KeyStore
from diffq.app.auth.quotas import Claim, Quotas, RateLimiter
from diffq.app.contract import keys
from diffq.app.contract.records import ModelRecord
from diffq.app.contract.tasks import model_queue
from diffq.app.main import create_app
from diffq.app.settings import Settings
from tests.helpers import TINY_JOB

pytestmark = pytest.mark.usefixtures("served")


@pytest.fixture
def keyed(settings: Settings) -> Iterator[TestClient]:
    """The API with API keys required (the deployment default)."""
    with TestClient(create_app(settings.model_copy(update={"auth": "keys"}))) as client:
        yield client


def new_key(redis: Redis, name: str = "shop-a", **limits: object) -> dict[str, str]:
    """Headers with a fresh key's bearer token (a rate no test reaches unless it sets one)."""
    _, token = KeyStore(redis).create(name, KeyLimits(**{"rate_limit": "10000/second", **limits}))
    return {"Authorization": f"Bearer {token}"}


def submit(client: TestClient, headers: dict[str, str], **fields: object) -> dict:
    response = client.post("/v1/jobs", json={**TINY_JOB, **fields}, headers=headers)
    assert response.status_code == 202, response.text
    return response.json()


# --- auth ------------------------------------------------------------------------------------


def test_every_kind_of_bad_key_gets_the_same_401(keyed: TestClient, redis: Redis) -> None:
    good = new_key(redis)
    revoked_headers = new_key(redis, "gone")
    KeyStore(redis).revoke(KeyStore(redis).find("gone")[0].id)
    token = good["Authorization"].removeprefix("Bearer ")
    wrong_secret = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    unknown_id = "dq_000000000000_" + token.split("_", 2)[2]
    cases = {
        "missing": {},
        "not bearer": {"Authorization": f"Basic {token}"},
        "malformed": {"Authorization": "Bearer hunter2"},
        "unknown id": {"Authorization": f"Bearer {unknown_id}"},
        "wrong secret": {"Authorization": f"Bearer {wrong_secret}"},
        "revoked": revoked_headers,
    }
    bodies = set()
    for name, headers in cases.items():
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/abc")):
            response = keyed.request(method, path, headers=headers, json=TINY_JOB if method == "POST" else None)
            assert response.status_code == 401, (name, path, response.text)
            assert response.headers["www-authenticate"].startswith("Bearer")
            bodies.add(response.text)
    assert len(bodies) == 1, bodies  # nothing tells which part was wrong
    assert keyed.get("/v1/models", headers=good).status_code == 200


def test_every_bad_key_costs_the_same_redis_work(keyed: TestClient, redis: Redis) -> None:
    """Same timing by construction: one HGETALL and one SHA-256 compare whatever is wrong."""
    good = new_key(redis)
    token = good["Authorization"].removeprefix("Bearer ")
    cases = [{}, {"Authorization": "Bearer hunter2"}, {"Authorization": f"Bearer {token[:-1]}x"},
             {"Authorization": "Bearer dq_000000000000_" + token.split("_", 2)[2]}]
    for headers in cases:
        redis.config_resetstat()
        assert keyed.get("/v1/models", headers=headers).status_code == 401
        connection = ("cmdstat_config", "cmdstat_info", "cmdstat_client", "cmdstat_hello")  # not the key check's
        stats = {name: info["calls"] for name, info in redis.info("commandstats").items() if name not in connection}
        assert stats == {"cmdstat_hgetall": 1}, (headers, stats)


def test_health_and_metrics_need_no_key(keyed: TestClient) -> None:
    assert keyed.get("/healthz").status_code == 200
    assert keyed.get("/metrics").status_code == 200
    assert keyed.get("/openapi.json").json()["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_the_openapi_document_lists_the_key_on_every_keyed_operation(keyed: TestClient) -> None:
    # get_caller reads the key itself (no FastAPI security dependency): the scheme is written by hand.
    paths = keyed.get("/openapi.json").json()["paths"]
    security = {(path, method): op.get("security") for path, ops in paths.items() for method, op in ops.items()}
    open_ones = {key for key, value in security.items() if value is None}
    assert open_ones == {("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get")}
    assert all(value == [{"HTTPBearer": []}] for key, value in security.items() if key not in open_ones)
    assert ("/v1/jobs", "post") in security and ("/sdapi/v1/txt2img", "post") in security


def test_keys_are_stored_hashed(redis: Redis) -> None:
    key, token = KeyStore(redis).create("shop-a")
    secret = token.split("_", 2)[2]
    stored = b"".join(k + v for k, v in redis.hgetall(f"diffq:apikey:{key.id}").items())
    assert secret.encode() not in stored
    assert KeyStore(redis).verify(token) == key


# --- isolation -------------------------------------------------------------------------------


def test_a_key_sees_only_its_own_jobs(keyed: TestClient, redis: Redis) -> None:
    a, b = new_key(redis, "shop-a"), new_key(redis, "shop-b")
    job = submit(keyed, a)
    job_id = job["id"]
    for method, path in [
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/jobs/{job_id}/events"),
        ("GET", f"/v1/jobs/{job_id}/preview.png"),
        ("GET", f"/v1/jobs/{job_id}/images/0.png"),
        ("GET", f"/v1/jobs/{job_id}/journey/0.webp"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
        ("DELETE", f"/v1/jobs/{job_id}"),
    ]:
        theirs = keyed.request(method, path, headers=b)
        missing = keyed.request(method, path.replace(job_id, "0" * 32), headers=b)
        assert theirs.status_code == 404, (path, theirs.text)
        assert theirs.json()["code"] == missing.json()["code"] == "job_not_found"
    assert keyed.get(f"/v1/jobs/{job_id}", headers=a).json()["status"] == "queued"  # B changed nothing
    assert [j["id"] for j in keyed.get("/v1/jobs", headers=a).json()["jobs"]] == [job_id]
    assert keyed.get("/v1/jobs", headers=b).json()["jobs"] == []
    assert len(job_id) == 32 and int(job_id, 16)  # 128 random bits


def test_idempotency_keys_belong_to_their_api_key(keyed: TestClient, redis: Redis) -> None:
    a, b = new_key(redis, "shop-a"), new_key(redis, "shop-b")
    first = keyed.post("/v1/jobs", json=TINY_JOB, headers={**a, "Idempotency-Key": "order-1"})
    other = keyed.post("/v1/jobs", json={**TINY_JOB, "prompt": "a blue square"}, headers={**b, "Idempotency-Key": "order-1"})
    assert first.status_code == other.status_code == 202
    assert first.json()["id"] != other.json()["id"]


# --- per-key limits --------------------------------------------------------------------------


def test_rate_limit_answers_429_with_retry_after_and_ratelimit_headers(keyed: TestClient, redis: Redis) -> None:
    limited, other = new_key(redis, "busy", rate_limit="3/minute"), new_key(redis, "calm")
    answers = [keyed.get("/v1/models", headers=limited) for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert answers[0].headers["ratelimit-limit"] == "3"
    assert [r.headers["ratelimit-remaining"] for r in answers[:3]] == ["2", "1", "0"]
    refused = answers[3]
    assert refused.json()["code"] == "rate_limited"
    # Until this minute ends, and then until its 3 hits weigh no more than 2 on the next: at most
    # 60 s + a third of 60 s.
    assert 1 <= int(refused.headers["retry-after"]) <= 80
    assert refused.headers["ratelimit-policy"] == "3;w=60"
    assert keyed.get("/v1/models", headers=other).status_code == 200  # another key has its own count


def test_a_key_revoked_while_in_use_is_refused_at_once(keyed: TestClient, redis: Redis) -> None:
    # The API remembers keys it has verified, but reads revocation with every request's rate check.
    headers = new_key(redis, "soon-gone")
    assert keyed.get("/v1/models", headers=headers).status_code == 200
    KeyStore(redis).revoke(KeyStore(redis).find("soon-gone")[0].id)
    refused = keyed.get("/v1/models", headers=headers)
    assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"


def test_a_key_removed_from_redis_is_refused_at_once(keyed: TestClient, redis: Redis) -> None:
    headers = new_key(redis, "wiped")
    assert keyed.get("/v1/models", headers=headers).status_code == 200
    redis.delete(keys.api_key(KeyStore(redis).find("wiped")[0].id))
    assert keyed.get("/v1/models", headers=headers).status_code == 401


def _evalsha_calls(redis: Redis) -> int:
    return int(redis.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def test_an_accepted_job_is_one_round_trip_its_rate_included(keyed: TestClient, redis: Redis) -> None:
    # POST /v1/jobs counts the key's rate in its submit script: one script call per accepted job (the
    # key, verified once, is remembered), with the rate headers all the same.
    headers = new_key(redis, "one-trip", rate_limit="5/minute")
    submit(keyed, headers)  # verifies and remembers the key
    before = _evalsha_calls(redis)
    accepted = keyed.post("/v1/jobs", json=TINY_JOB, headers=headers)
    assert accepted.status_code == 202, accepted.text
    assert _evalsha_calls(redis) - before == 1
    assert accepted.headers["ratelimit-remaining"] == "3" and accepted.headers["ratelimit-policy"] == "5;w=60"


def test_a_submit_refused_before_its_script_still_counts_and_429_comes_first(keyed: TestClient, redis: Redis) -> None:
    # Refusals of the body (422, 415) and of the model are counted against the rate as before, and a key
    # over its rate gets 429, not the body's error, as when the rate was counted before the body was read.
    headers = new_key(redis, "sloppy", rate_limit="3/minute")
    bad = keyed.post("/v1/jobs", json={**TINY_JOB, "steps": -1}, headers=headers)
    assert bad.status_code == 422
    unknown = keyed.post("/v1/jobs", json={**TINY_JOB, "model": "nope"}, headers=headers)
    assert unknown.status_code == 422 and unknown.json()["fields"][0]["field"] == "model"
    assert submit(keyed, headers)["status"] == "queued"  # the third of three
    over = [
        keyed.post("/v1/jobs", json={**TINY_JOB, "steps": -1}, headers=headers),
        keyed.post("/v1/jobs", json=TINY_JOB, headers=headers),
        keyed.post("/v1/jobs", content=b"prompt=x", headers={**headers, "content-type": "text/plain"}),
    ]
    assert [r.status_code for r in over] == [429, 429, 429], [r.text for r in over]
    assert all(r.json()["code"] == "rate_limited" and "retry-after" in r.headers for r in over)


def test_a_key_revoked_is_refused_by_the_submit_script(keyed: TestClient, redis: Redis) -> None:
    headers = new_key(redis, "revoked-mid-way")
    submit(keyed, headers)
    KeyStore(redis).revoke(KeyStore(redis).find("revoked-mid-way")[0].id)
    jobs_before = redis.zcard(keys.owner_jobs(KeyStore(redis).find("revoked-mid-way")[0].id))
    refused = keyed.post("/v1/jobs", json=TINY_JOB, headers=headers)
    assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"
    assert redis.zcard(keys.owner_jobs(KeyStore(redis).find("revoked-mid-way")[0].id)) == jobs_before  # nothing written


def test_rate_window_slides_over_the_previous_window(redis: Redis) -> None:
    # 3 a second: after 3 hits the 4th is refused until enough of the previous window has slid out.
    # The hits come early in a second (Redis's clock), the hardest case: the full window ends in
    # ~0.9 s, but its 3 hits still weigh 2.7 on the next one, which lets a request through only
    # once they have slid down to 2, a third of a second later. Retry-After must cover both.
    key_id = KeyStore(redis).create("sliding", KeyLimits(rate_limit="3/second"))[0].id
    limiter = RateLimiter(redis)
    seconds, micros = redis.time()
    time.sleep(1 - micros / 1e6 + 0.02)
    decisions = [limiter.hit(key_id, "3/second") for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions[:3]] == [2, 1, 0]
    assert decisions[3].headers()["Retry-After"] == "2"
    time.sleep(decisions[3].reset_seconds + 0.05)
    assert limiter.hit(key_id, "3/second").allowed


def test_a_keys_rate_is_two_fields_of_its_record_three_commands_a_request(redis: Redis) -> None:
    # The revocation and both windows' counts in one HMGET, the count in one HSET: no counter keys.
    key_id = KeyStore(redis).create("counted", KeyLimits(rate_limit="5/second"))[0].id
    limiter = RateLimiter(redis)
    limiter.hit(key_id, "5/second")  # loads the script
    calls = {name: stats["calls"] for name, stats in redis.info("commandstats").items()}
    limiter.hit(key_id, "5/second")
    after = {name: stats["calls"] for name, stats in redis.info("commandstats").items()}
    spent = {name: after[name] - calls.get(name, 0) for name in after if after[name] != calls.get(name, 0)}
    spent.pop("cmdstat_info", None)
    assert spent == {"cmdstat_evalsha": 1, "cmdstat_hmget": 1, "cmdstat_hset": 1}
    record = keys.api_key(key_id)
    assert sorted(f for f in redis.hkeys(record) if f.startswith(b"rate:")) in ([b"rate:5/1:0"], [b"rate:5/1:1"],
                                                                                [b"rate:5/1:0", b"rate:5/1:1"])
    assert redis.keys("diffq:ratelimit*") == []
    assert KeyStore(redis).get(key_id).name == "counted"  # the counters are not the key's fields
    # Counts of windows long gone (a quiet key) weigh nothing: full slots of old windows, all 5 left.
    redis.hset(record, mapping={"rate:5/1:0": "10:99", "rate:5/1:1": "11:99"})
    decision = limiter.hit(key_id, "5/second")
    assert decision.allowed and decision.remaining == 4


def test_a_wait_claim_drops_lapsed_claims_only_when_they_would_refuse_it(redis: Redis) -> None:
    quotas, waits = Quotas(redis, "owner-1"), keys.owner_waits("owner-1")
    redis.zadd(waits, {"crashed-process": time.time() - 1})  # lapsed a second ago, never closed
    first = quotas.open_claim({waits: 2})
    assert isinstance(first, Claim) and redis.zcard(waits) == 2  # below the cap: left for the set's TTL
    second = quotas.open_claim({waits: 2})  # at the cap: the lapsed claim goes, this one fits
    assert isinstance(second, Claim) and redis.zscore(waits, "crashed-process") is None
    assert quotas.open_claim({waits: 2}) == waits  # two live claims: full
    quotas.close_claim(first)
    assert isinstance(quotas.open_claim({waits: 2}), Claim)


def test_queued_job_cap(keyed: TestClient, redis: Redis) -> None:
    capped = new_key(redis, max_queued_jobs=2)
    first, _ = submit(keyed, capped), submit(keyed, capped)
    refused = keyed.post("/v1/jobs", json=TINY_JOB, headers=capped)
    assert refused.status_code == 429 and refused.json()["code"] == "too_many_queued_jobs"
    assert "Retry-After" in refused.headers
    keyed.post(f"/v1/jobs/{first['id']}/cancel", headers=capped)
    submit(keyed, capped)  # a canceled job no longer counts


def test_job_budget_names_the_fields(keyed: TestClient, redis: Redis) -> None:
    small = new_key(redis, max_job_cost=16 * 16 * 4)
    refused = keyed.post("/v1/jobs", json={**TINY_JOB, "steps": 5}, headers=small)
    assert refused.status_code == 422, refused.text
    [field] = refused.json()["fields"]
    assert field["field"] == "steps" and "width × height × steps × num_images" in field["message"]
    submit(keyed, small, steps=4)


def test_a_key_can_strip_png_metadata(keyed: TestClient, redis: Redis) -> None:
    stripping, keeping = new_key(redis, "private", strip_metadata=True), new_key(redis, "open")
    assert submit(keyed, stripping, metadata=True)["request"]["metadata"] is False
    assert submit(keyed, keeping)["request"]["metadata"] is True
    assert submit(keyed, keeping, metadata=False)["request"]["metadata"] is False  # per request too


# --- queue order: priority classes and fair share --------------------------------------------


def _queue(redis: Redis, model: ModelRecord) -> Queue:
    return Queue(model_queue(model.name, redis).name, connection=redis, serializer=JSONSerializer)


def _take(queue: Queue, redis: Redis, n: int) -> list[str]:
    """Dequeue ``n`` jobs the way an RQ worker does (BLPOP off the front), marking each started."""
    taken = []
    for _ in range(n):
        job, _ = Queue.dequeue_any([queue], timeout=None, connection=redis, serializer=JSONSerializer)
        redis.hset(f"diffq:job:{job.id}", "status", '"running"')  # as the worker's claim does
        taken.append(job.id)
    return taken


def test_fair_share_b_starts_after_at_most_two_more_of_a(keyed: TestClient, redis: Redis, served: ModelRecord) -> None:
    a, b = new_key(redis, "shop-a"), new_key(redis, "shop-b")
    queue = _queue(redis, served)
    a_jobs = [submit(keyed, a)["id"] for _ in range(100)]
    assert queue.get_job_ids() == a_jobs  # alone, A's jobs keep their order
    started = _take(queue, redis, 7)  # a worker has started some of them
    b_job = submit(keyed, b)["id"]
    order = _take(queue, redis, 3)
    assert b_job in order, order
    assert order.index(b_job) <= 2  # at most 2 more of A's first
    assert started + [i for i in order if i != b_job] == a_jobs[: 7 + len(order) - 1]  # A's own order kept


def test_fair_share_interleaves_two_busy_keys(keyed: TestClient, redis: Redis, served: ModelRecord) -> None:
    a, b = new_key(redis, "shop-a"), new_key(redis, "shop-b")
    a_jobs = [submit(keyed, a)["id"] for _ in range(6)]
    b_jobs = [submit(keyed, b)["id"] for _ in range(3)]
    order = _queue(redis, served).get_job_ids()
    owners = "".join("a" if job in a_jobs else "b" for job in order)
    assert owners == "abababaaa", owners


def test_a_high_priority_key_goes_first_and_low_goes_last(keyed: TestClient, redis: Redis, served: ModelRecord) -> None:
    low, normal, high = (new_key(redis, name, priority=name) for name in ("low", "normal", "high"))
    low_jobs = [submit(keyed, low)["id"] for _ in range(2)]
    normal_jobs = [submit(keyed, normal)["id"] for _ in range(2)]
    high_job = submit(keyed, high)["id"]
    assert _queue(redis, served).get_job_ids() == [high_job, *normal_jobs, *low_jobs]
    assert keyed.get(f"/v1/jobs/{high_job}", headers=high).json()["queue_position"] == 0


def test_canceled_and_taken_jobs_do_not_disturb_the_order(keyed: TestClient, redis: Redis, served: ModelRecord) -> None:
    a, b = new_key(redis, "shop-a"), new_key(redis, "shop-b")
    a_jobs = [submit(keyed, a)["id"] for _ in range(4)]
    keyed.post(f"/v1/jobs/{a_jobs[1]}/cancel", headers=a)
    keyed.delete(f"/v1/jobs/{a_jobs[2]}", headers=a)
    queue = _queue(redis, served)
    _take(queue, redis, 1)
    b_job = submit(keyed, b)["id"]
    assert queue.get_job_ids() == [a_jobs[3], b_job] or queue.get_job_ids() == [b_job, a_jobs[3]]


def test_a_submit_renews_the_fair_keys_ttl_once_per_eighth_of_it_and_leaves_rq_s_queue_set_to_the_workers(
    keyed: TestClient, redis: Redis, served: ModelRecord, settings: Settings
) -> None:
    """The fair order's zset and state hash live the job TTL past the last renewal; a submit renews
    them only when an eighth of it has passed since (the state's `renewed` stamp), not at every
    submit. RQ's set of queues lists the model's queue from its worker's registration; a submit
    does not write it."""
    headers = new_key(redis, "renewals")
    queue = _queue(redis, served)
    zset, state = keys.fair(queue.name), keys.fair_state(queue.name)
    assert queue.key.encode() in redis.smembers("rq:queues")  # from the registration (`served`)
    redis.delete("rq:queues")
    submit(keyed, headers)
    assert redis.smembers("rq:queues") == set()  # the submit leaves it to the workers
    ttl = settings.job_ttl
    assert ttl - 5 <= redis.ttl(zset) <= ttl and ttl - 5 <= redis.ttl(state) <= ttl
    stamp = float(redis.hget(state, "renewed"))
    assert abs(stamp - time.time()) < 60

    redis.expire(zset, 1000)
    redis.expire(state, 1000)
    submit(keyed, headers)  # within an eighth of the TTL of the stamp: no renewal
    assert redis.ttl(zset) <= 1000 and redis.ttl(state) <= 1000
    assert float(redis.hget(state, "renewed")) == stamp

    redis.hset(state, "renewed", str(stamp - ttl / 8 - 1))
    submit(keyed, headers)  # an eighth of the TTL later: both renewed, the stamp moved on
    assert redis.ttl(zset) > 1000 and redis.ttl(state) > 1000
    assert float(redis.hget(state, "renewed")) > stamp - 1
    assert len(queue.get_job_ids()) == 3


def test_an_owners_job_index_is_trimmed_to_its_size_on_one_submit_in_16(
    keyed: TestClient, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner's job index (GET /v1/jobs) keeps its newest JOBS_INDEX_MAX ids: trimmed by the
    submits whose random id ends in 0, so it holds at most a few more between two trims."""
    from diffq.app.core import jobs

    monkeypatch.setattr(keys, "JOBS_INDEX_MAX", 3)
    headers = new_key(redis, "index-trim")
    made = iter([*(f"{n:031x}1" for n in range(5)), "f" * 31 + "0"])
    monkeypatch.setattr(jobs, "new_job_id", lambda: next(made))
    for _ in range(5):
        submit(keyed, headers)
    owner = KeyStore(redis).find("index-trim")[0].id
    assert redis.zcard(keys.owner_jobs(owner)) == 5  # no id ended in 0: not trimmed yet
    last = submit(keyed, headers)["id"]
    assert last.endswith("0")
    assert redis.zcard(keys.owner_jobs(owner)) == 3  # trimmed to the newest three
    assert redis.zrange(keys.owner_jobs(owner), -1, -1) == [last.encode()]
