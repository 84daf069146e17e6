"""app/main.py: the app is built without torch, and documents itself."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from fastapi.testclient import TestClient

from diffq.app.settings import Settings


def test_api_never_imports_torch_or_diffusers() -> None:
    """Import every module under app/ and build the app, in a clean interpreter."""
    script = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        import diffq.app
        for module in pkgutil.walk_packages(diffq.app.__path__, "diffq.app."):
            importlib.import_module(module.name)
        from diffq.app.main import create_app
        from fastapi.testclient import TestClient
        with TestClient(create_app()) as client:
            assert client.get("/openapi.json").status_code == 200
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "diffusers", "transformers", "numpy"})
        print(heavy)
        sys.exit(1 if heavy else 0)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_openapi_documents_endpoints_and_settings_limits(client: TestClient, settings: Settings) -> None:
    schema = client.get("/openapi.json").json()

    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/images/{index}.{extension}", "/v1/models", "/healthz",
            "/readyz"} <= set(schema["paths"])
    post = schema["paths"]["/v1/jobs"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobCreate"}
    assert set(post["responses"]) >= {"202", "422"}
    job_create = schema["components"]["schemas"]["JobCreate"]["properties"]
    assert job_create["prompt"]["maxLength"] == settings.max_prompt_length
    assert job_create["steps"]["anyOf"][0]["maximum"] == settings.max_steps
    assert job_create["num_images"]["maximum"] == settings.max_images_per_job
    assert schema["components"]["schemas"]["Error"]["required"] == ["code", "message"]


def test_docs_page_is_served(client: TestClient) -> None:
    response = client.get("/docs")
    assert response.status_code == 200 and "swagger" in response.text.lower()


def test_unknown_routes_answer_with_the_error_body(client: TestClient) -> None:
    response = client.get("/v2/nothing")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
