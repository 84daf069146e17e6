"""Fuzzing: schemathesis sends generated requests to every operation of ``/openapi.json``.

The API runs as deployed: ``create_app`` under a real uvicorn server, started in
this process (a thread) on a free loopback port, so requests cross real HTTP
and the whole ASGI stack (the body size limit, the job-id log context, the
exception handlers, the lifespan that opens the Redis clients). Starlette's
ASGI test transport would skip the HTTP parsing and framing that uvicorn does
(``Content-Length``, chunked bodies, header encoding), which is where odd
generated input meets the app first. The schema is loaded from the live
server's ``/openapi.json`` (``schemathesis.pytest.from_fixture``), so it is the
document clients get, with this deployment's limits in ``JobCreate``.

Behind it: the test suite's real ``redis-server`` and the tiny model registered
as if a worker served it (``served``), so ``POST /v1/jobs`` is validated
against a model and valid jobs are queued. API keys are on, as deployed: every
request carries one key (``auth_headers()``; its rate and queue cap set beyond
what the run reaches), so ``GET /v1/jobs`` answers that key's jobs and their
bodies are checked too.

Checks: schemathesis' standard set (``case.call_and_validate``): a documented
status code, content type and headers, a body matching the response schema,
4xx for schema-invalid input, ``405`` with an exact ``Allow`` for methods the
path does not have, no 5xx. Two changes, each for a reason:

- ``positive_data_acceptance`` (every schema-valid request must be accepted) is
  off: much of what diffq validates cannot be said in JSON Schema (a base64
  string that decodes to an image, a size that is a multiple of the served
  model's, a model or scheduler name that a live worker serves, a prompt that is
  not all whitespace), so schema-valid requests are rightly refused with 422.
- No worker runs: a valid request to an endpoint that waits for its job
  (OpenAI's ``generations``, ``edits``, ``variations``; A1111's ``txt2img``,
  ``img2img``) waits ``openai_timeout`` / ``sdapi_timeout`` (0.2 s here) for its
  queued job and answers its documented ``504``. That one 5xx is accepted (and
  counted); any other 5xx fails (``not_a_server_error_but_the_wait_timeout``).

Generation is deterministic (``derandomize``): the same requests on every run,
about a thousand in 45 s on 2 cores (most from schemathesis' coverage phase;
``MAX_EXAMPLES`` bounds the random fuzzing phase per operation). The run
prints the count and fails under ``MIN_REQUESTS``. No operation is excluded:
ids that schemathesis makes up never name a job, so the long poll (``?wait=``)
and the event stream answer 404 at once instead of blocking.

Every request carries ``auth_headers(case)``: the key made for the run, except
negative cases whose broken part is the headers (a dropped or mangled
``Authorization``), which go as generated and must get 401.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck
from schemathesis import checks
from schemathesis.core.parameters import ParameterLocation

from redis import Redis

from diffq.app.api.slow_clients import uvicorn_options
from diffq.app.auth.apikeys import KeyLimits, KeyStore
from diffq.app.contract.records import ModelRecord, WorkerRecord, utcnow
from diffq.app.contract.registry import Registry
from diffq.app.contract.tasks import queue_name
from diffq.app.embedded_redis import free_port
from diffq.app.main import create_app
from diffq.app.settings import Settings

#: Generated cases per operation in the fuzzing phase (the coverage and examples phases add their own).
MAX_EXAMPLES = 20
#: The fewest requests one run must send.
MIN_REQUESTS = 300

#: The endpoints that wait for a worker (see ``not_a_server_error_but_the_wait_timeout``).
OPENAI_WAITING = ("POST /v1/images/generations", "POST /v1/images/edits", "POST /v1/images/variations")
A1111_WAITING = ("POST /sdapi/v1/txt2img", "POST /sdapi/v1/img2img")

#: Requests sent, by operation ("GET /healthz"); read by the ``request_count`` fixture after the run.
SENT: dict[str, int] = {}
#: Answers that were a waiting endpoint's 504 timeout (the only 5xx accepted).
TIMEOUTS: list[str] = []
#: The run's API key, as a header (set by ``api_url``).
AUTH: dict[str, str] = {}


def auth_headers(case: Any) -> dict[str, str]:
    """The run's API key for a generated request, unless the case's headers are the broken part
    (a negative case that drops or mangles ``Authorization``): those go as generated, to get 401."""
    header = case.meta.components.get(ParameterLocation.HEADER) if case.meta is not None else None
    if header is not None and header.mode.is_negative:
        return {}
    return dict(AUTH)


@pytest.fixture
def api_url(settings: Settings, served: ModelRecord, redis: Redis) -> Iterator[str]:
    """The app under uvicorn on a free loopback port, with API keys on and a served model; its base URL."""
    # The per-key and per-process limits of issue 19 set low, so the run crosses them as deployed.
    limits = {"max_waits": 2, "redis_wait_connections": 4, "redis_max_connections": 16, "decode_concurrency": 1,
              "decode_concurrency_per_key": 1, "http_header_timeout": 5.0, "http_body_timeout": 10.0,
              "http_max_connections": 50, "max_upload_pixels": 64 * 64, "max_resize_pixels": 256 * 256}
    fuzz_settings = settings.model_copy(update={"openai_timeout": 0.2, "sdapi_timeout": 0.2, "auth": "keys", **limits})
    # The run takes about a minute on a loaded 2-core machine: the served model must outlive it
    # (``served`` announces it for 60 s), or late requests rightly get 503 no_workers.
    Registry(redis, ttl=600).announce(_worker_of(served), served)
    _, token = KeyStore(redis).create("fuzz", KeyLimits(rate_limit="100000/second", max_queued_jobs=100000))
    AUTH["Authorization"] = f"Bearer {token}"
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(fuzz_settings), host="127.0.0.1", port=port, lifespan="on",
                       log_config=None, log_level=None,  # leaves the process's loggers as they are, for later tests
                       **uvicorn_options(fuzz_settings))  # the header deadline and connection cap of `diffq api`
    )
    thread = threading.Thread(target=server.run, name="fuzz-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def _worker_of(model: ModelRecord) -> WorkerRecord:
    now = utcnow()
    return WorkerRecord(id="test-worker", model=model.name, device=model.device, dtype=model.dtype, host="localhost",
                        pid=1, queue=queue_name(model.name), started_at=now, heartbeat_at=now)


@pytest.fixture
def api_schema(api_url: str) -> Any:
    return schemathesis.openapi.from_url(f"{api_url}/openapi.json")


@pytest.fixture
def request_count() -> Iterator[dict[str, int]]:
    """The requests sent by the fuzz run; at least ``MIN_REQUESTS`` once it is over."""
    SENT.clear()
    TIMEOUTS.clear()
    yield SENT
    total = sum(SENT.values())
    print(f"\nschemathesis sent {total} requests ({len(TIMEOUTS)} answered by a 504 timeout): "
          + ", ".join(f"{k} {v}" for k, v in sorted(SENT.items())))
    assert total >= MIN_REQUESTS, f"only {total} requests sent"


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32's ``from_fixture`` reads ``node._nodeid``, which pytest 9.2 no longer has
    (``nodeid`` is derived from ``node._id``): give it one. What it writes back there only renamed
    the test in reports; failures still name their operation (``case.operation.label``)."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_api_answers_every_generated_request_as_documented(case: Any, request_count: dict[str, int]) -> None:
    label = f"{case.method.upper()} {case.path}"
    request_count[label] = request_count.get(label, 0) + 1
    case.call_and_validate(
        headers=auth_headers(case),
        timeout=30,
        excluded_checks=[checks.not_a_server_error, checks.positive_data_acceptance],
        additional_checks=[not_a_server_error_but_the_wait_timeout],
    )


def not_a_server_error_but_the_wait_timeout(ctx: Any, response: Any, case: Any) -> bool | None:
    """schemathesis' ``not_a_server_error``, except for the one 5xx this setup must produce: no worker runs, so
    a valid request to an endpoint that waits for its job answers the documented ``504`` timeout once its
    wait is over. Any other 5xx there (a 500, a 503) still fails."""
    label = case.operation.label
    if label in OPENAI_WAITING + A1111_WAITING and response.status_code == 504:
        timeout = response.json()["error"]["code"] if label in OPENAI_WAITING else response.json()["error"]
        assert timeout in ("timeout", "TimeoutError"), response.text
        TIMEOUTS.append(label)
        return None
    return checks.not_a_server_error(ctx, response, case)
