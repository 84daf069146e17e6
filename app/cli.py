"""The ``diffq`` command: ``up`` (everything, one command), ``api``, ``worker`` and ``webhooks`` (the parts);
``generate``, ``jobs`` and ``cancel`` (a client of a running API: ``diffq.app.client_cli``); ``keys`` (API keys:
``diffq.app.auth.cli``).

Importing this module imports neither torch nor the worker: ``diffq api``
stays light, and ``diffq worker`` imports the worker only when it runs. Nor does it import the
server's part: the client commands run on a plain ``pip install diffq`` (httpx and tqdm), and a
server command there says which extra it needs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffq.app.client_cli import ApiAddress
    from diffq.app.settings import Settings


def _settings(args: argparse.Namespace, **fields: str) -> Settings:
    """The environment's settings with the options given on the command line on top."""
    from diffq.app.settings import Settings, load_settings

    updates = {field: getattr(args, option) for option, field in fields.items() if getattr(args, option) is not None}
    return Settings(**updates) if updates else load_settings()


def _configure_logging(settings: Settings) -> None:
    from diffq.app.logs import setup  # JSON lines (DIFFQ_LOG_FORMAT), job ids on every line about a job

    setup(settings)


def run_api(args: argparse.Namespace) -> int:
    import uvicorn

    from diffq.app.api.slow_clients import uvicorn_options
    from diffq.app.main import create_app

    settings = _settings(args, host="host", port="port")
    _configure_logging(settings)
    if (refusal := _eviction_refusal(settings)) is not None:  # one clear line, not uvicorn's traceback
        print(f"diffq api: {refusal}", file=sys.stderr)
        return 2
    if not _store_ready(settings, "api"):
        return 2
    # Header and body deadlines, keep-alive and a cap on concurrent connections (diffq.app.api.slow_clients).
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,
        **uvicorn_options(settings),
    )  # uvicorn's lines go through diffq.app.logs too
    return 0


def _eviction_refusal(settings: Settings) -> str | None:
    """Why Redis's maxmemory-policy forbids starting, if it does (the app's lifespan checks again)."""
    from redis.exceptions import RedisError

    from diffq.app.contract import connection, memory

    client = connection.sync_client(settings, socket_connect_timeout=2, socket_timeout=5)
    try:
        memory.check_policy(client, settings.redis_allow_eviction)
    except memory.EvictionPolicyError as error:
        return str(error)
    except RedisError:
        return None  # down now: the API starts anyway and says so on /readyz
    finally:
        client.close()
    return None


def run_worker(args: argparse.Namespace) -> int:
    settings = _settings(args, model="model_path", name="model_name", device="device", dtype="dtype")
    _configure_logging(settings)
    from diffq.app.provenance.credentials import CredentialsError
    from diffq.worker.marking import Marker
    from diffq.worker.service import load_models  # imports the model stack only now
    from diffq.worker.service import run_worker as serve

    if not _store_ready(settings, "worker"):
        return 2
    try:
        marker = Marker.from_settings(settings)  # before the model: a bad certificate fails in a second
    except CredentialsError as error:
        print(f"diffq worker: {error}", file=sys.stderr)
        return 2
    try:
        models = load_models(settings)  # every model it serves (DIFFQ_MODELS, DIFFQ_MODELS_DIR), each once
    except (FileNotFoundError, ValueError) as error:  # a missing folder, a bad device/dtype, an unservable model
        print(f"diffq worker: cannot serve {settings.model_path}: {error}", file=sys.stderr)
        return 2
    from diffq.app.contract.memory import EvictionPolicyError

    try:
        serve(settings, models=models, burst=args.burst, marker=marker)
    except EvictionPolicyError as error:
        print(f"diffq worker: {error}", file=sys.stderr)
        return 2
    return 0


def _store_ready(settings: Settings, command: str) -> bool:
    """Whether this process can write to its result store; if not, say which setting to fix."""
    from redis import Redis

    from diffq.app.storage.base import StorageConfigError, StorageUnavailableError
    from diffq.app.storage.factory import ready_store

    try:
        ready_store(settings, Redis.from_url(settings.redis_url))
    except (StorageConfigError, StorageUnavailableError) as error:
        print(f"diffq {command}: cannot use the result store (DIFFQ_STORE={settings.store}): {error}", file=sys.stderr)
        return False
    return True


def run_webhooks(args: argparse.Namespace) -> int:
    from diffq.app.webhooks.deliver import main as deliver

    settings = _settings(args)
    _configure_logging(settings)
    return deliver(settings)


def run_up(args: argparse.Namespace) -> int:
    from diffq.app.launcher import up

    settings = _settings(args, host="host", port="port", model="model_path")
    return up(settings)


def run_keys(args: argparse.Namespace) -> int:
    from diffq.app.auth.cli import main as keys
    from diffq.app.settings import load_settings

    return keys(args, load_settings())


def _client_address() -> ApiAddress:
    """Where the client commands find the API: the deployment's settings where the server's part is
    installed (the same validation as ``diffq api``), else ``DIFFQ_URL``/``DIFFQ_HOST``/``DIFFQ_PORT``
    read by the client itself (a plain ``pip install diffq`` has no pydantic-settings)."""
    from diffq.app.client_cli import EnvironmentAddress
    from diffq.app.logs import setup

    try:
        from diffq.app.settings import load_settings
    except ImportError:
        setup(level="warning")
        return EnvironmentAddress.read()
    settings = load_settings()
    setup(settings, level="warning")
    return settings


def _client_command(name: str) -> Callable[[argparse.Namespace], int]:
    """``generate``, ``jobs``, ``cancel``: ``diffq.app.client_cli.<name>`` with the API's address."""

    def run(args: argparse.Namespace) -> int:
        from diffq.app import client_cli

        return getattr(client_cli, name)(args, _client_address())

    return run


def run_batch(args: argparse.Namespace) -> int:
    """``diffq batch ...``: ``diffq.app.batch_cli`` with the API's address."""
    from diffq.app import batch_cli

    return batch_cli.main(args, _client_address())


#: What to install for a command whose modules are missing from this install.
_EXTRA = {"worker": "diffq[worker]", "up": "diffq[worker]"}


def _needs_server(command: str, missing: str | None) -> Callable[[argparse.Namespace], int]:
    """``command``'s stand-in where the module ``missing`` (of an extra this install lacks) is absent."""

    def run(args: argparse.Namespace) -> int:
        extra = _EXTRA.get(command, "diffq[api]")
        print(f"diffq {command}: needs {missing}, which this install lacks; pip install '{extra}'", file=sys.stderr)
        return 2

    return run


def _add_server_command(commands: Any, command: str, help: str, add: Callable[[], None]) -> None:
    """Add ``command``'s parser with ``add()``; where its modules (the server's part) are not installed,
    a stand-in that says which extra to install."""
    try:
        add()
    except ImportError as error:
        stand_in = commands.add_parser(command, help=f"{help} (needs diffq[api])")
        stand_in.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        stand_in.set_defaults(run=_needs_server(command, error.name))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffq", description="REST inference service for latent diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser(
        "up", help="start Redis (embedded unless DIFFQ_REDIS_URL is set), the API, one worker and a webhook deliverer"
    )
    up.add_argument("--port", type=int, help="API port (default: DIFFQ_PORT or 8000)")
    up.add_argument("--host", help="API address (default: DIFFQ_HOST or 127.0.0.1)")
    up.add_argument("--model", type=Path, help="model folder of the worker (default: DIFFQ_MODEL_PATH)")
    up.set_defaults(run=run_up)

    api = commands.add_parser("api", help="run the HTTP API (no torch needed)")
    api.add_argument("--port", type=int, help="default: DIFFQ_PORT or 8000")
    api.add_argument("--host", help="default: DIFFQ_HOST or 127.0.0.1")
    api.set_defaults(run=run_api)

    worker = commands.add_parser("worker", help="run one worker serving one model")
    worker.add_argument(
        "--model", type=Path, help="diffusers model folder (default: DIFFQ_MODEL_PATH, the bundled model)"
    )
    worker.add_argument(
        "--name", help="name to serve the model under (default: DIFFQ_MODEL_NAME, else the model's own)"
    )
    worker.add_argument("--device", help="auto, cpu, cuda, cuda:1, ... (default: DIFFQ_DEVICE or auto)")
    worker.add_argument("--dtype", help="auto, float32, float16, bfloat16 (default: DIFFQ_DTYPE or auto)")
    worker.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    worker.set_defaults(run=run_worker)

    webhooks = commands.add_parser(
        "webhooks", help="run a webhook deliverer: sends, signs and retries job webhooks (no torch needed)"
    )
    webhooks.set_defaults(run=run_webhooks)

    def add_verify() -> None:
        from diffq.app.provenance.cli import add_command

        add_command(commands)

    _add_server_command(commands, "verify", "check images for content credentials", add_verify)

    from diffq.app.client_cli import add_commands

    add_commands(commands, _client_command("generate"), _client_command("list_jobs"), _client_command("cancel"))

    from diffq.app.batch_cli import add_command as add_batch

    add_batch(commands, run_batch)

    def add_keys() -> None:
        from diffq.app.auth import cli as keys_cli

        keys_cli.add_commands(commands, run_keys)

    _add_server_command(commands, "keys", "create, list and revoke API keys", add_keys)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except ModuleNotFoundError as error:
        # A server command on a client-only install (`pip install diffq`): say what to install, not a traceback.
        if (error.name or "diffq").partition(".")[0] == "diffq":
            raise
        return _needs_server(args.command, error.name)(args)


if __name__ == "__main__":
    sys.exit(main())
