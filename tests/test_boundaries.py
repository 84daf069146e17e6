"""Package boundaries: what each part of diffq may import (issue 23).

Each check imports a part in a fresh interpreter and reads ``sys.modules``: an import is
refused there whether it is written at the top of a module or reached through another one.
"""

import json
import pkgutil
import subprocess
import sys
import textwrap

import app.contract

# Importing the contract must not bring in the API's modules (the worker and the deliverer import it),
# nor the model stack.
CONTRACT_FORBIDDEN = (
    "app.api", "app.auth", "app.core", "app.settings", "app.main", "app.deps", "app.webhooks", "app.storage",
    "app.schemas", "fastapi", "starlette", "pydantic_settings", "torch", "diffusers", "transformers",
)


def _imported(statements: str) -> list[str]:
    """The modules in ``sys.modules`` after running ``statements`` in a fresh interpreter."""
    script = textwrap.dedent(statements) + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def _offending(modules: list[str], forbidden: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == f or m.startswith(f + ".") for f in forbidden)]


def contract_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(app.contract.__path__, "app.contract."))


def test_every_contract_module_is_listed() -> None:
    # The webhook queue and outbox are part of the contract (the job scripts write them).
    expected = {"app.contract.webhook_queue", "app.contract.webhook_outbox", "app.contract.store"}
    assert expected <= set(contract_modules())


def test_the_contract_imports_without_the_api_or_the_model_stack() -> None:
    modules = _imported("\n".join(f"import {name}" for name in contract_modules()))

    assert "app.contract.store" in modules
    assert _offending(modules, CONTRACT_FORBIDDEN) == []


def test_the_boundary_check_sees_a_forbidden_import() -> None:
    # The check above must be able to fail: the API's settings module is on the forbidden list.
    modules = _imported("import app.contract.keys\nimport app.settings")

    assert "app.settings" in _offending(modules, CONTRACT_FORBIDDEN)
