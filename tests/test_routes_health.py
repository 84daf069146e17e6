"""app/api/routes/health.py: liveness always; readiness needs Redis and a live worker."""

from __future__ import annotations

from fastapi.testclient import TestClient

from diffq.app.embedded_redis import free_port
from diffq.app.main import create_app
from diffq.app.settings import Settings


def test_healthz_answers_without_anything_else(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_readyz_is_503_until_a_worker_registers(client: TestClient, request) -> None:
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"ready": False, "redis": True, "store": True, "store_backend": "redis", "workers": 0,
                               "models": [], "queues_full": []}

    request.getfixturevalue("served")

    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"ready": True, "redis": True, "store": True, "store_backend": "redis", "workers": 1,
                               "models": ["tiny"], "queues_full": []}


def test_redis_down_means_not_ready_and_503s(settings: Settings) -> None:
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(create_app(down)) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["redis"] is False

        response = client.get("/v1/jobs/abc")
        assert response.status_code == 503
        assert response.json()["code"] == "store_unavailable"
        assert response.headers["retry-after"] == "1"
