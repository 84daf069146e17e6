"""diffq.worker.models: several models on one worker, a bounded cache of loaded pipelines, no starvation.

Unit tests of the settings, the queue order and the cache (real tiny engines), then a real
`diffq api` and `diffq worker` serving two tiny models with device memory for one, under a
stream of jobs for one of them.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from diffq.app.embedded_redis import EmbeddedRedis
from diffq.app.settings import Settings
from diffq.model.engine import Engine
from tests.helpers import wait_for
from tests.services import services
from tests.tiny_pipelines import build_sd1
from diffq.worker.models import ModelCache, ModelConfigError, QueueChooser, model_sources


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("served")
    return {"alpha": build_sd1(root / "alpha", seed=1), "beta": build_sd1(root / "beta", seed=2)}


def load(path: Path) -> Engine:
    return Engine.load(path, device="cpu", dtype="float32")


# -- settings ------------------------------------------------------------------------------------


def test_models_come_from_the_main_path_a_list_and_a_folder(two_models: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "gamma.safetensors").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not a model")
    settings = Settings(_env_file=None, model_path=two_models["alpha"], models=f"b={two_models['beta']}",
                        models_dir=tmp_path)
    assert model_sources(settings) == {"alpha": two_models["alpha"], "b": two_models["beta"],
                                       "gamma": tmp_path / "gamma.safetensors"}


def test_only_the_listed_models_are_served_when_the_main_path_is_the_default(two_models: dict[str, Path]) -> None:
    settings = Settings(_env_file=None, models=f"b={two_models['beta']}")
    assert list(model_sources(settings)) == ["b"]


@pytest.mark.parametrize("models", ["just-a-path", "=/x", "a="])
def test_bad_model_lists_are_refused(models: str) -> None:
    with pytest.raises(ModelConfigError):
        model_sources(Settings(_env_file=None, models=models))


def test_a_name_given_twice_is_refused(two_models: dict[str, Path]) -> None:
    with pytest.raises(ModelConfigError, match="given twice"):
        model_sources(Settings(_env_file=None, models=f"a={two_models['alpha']},a={two_models['beta']}"))


def test_a_name_given_twice_for_the_same_folder_is_served_once(two_models: dict[str, Path], monkeypatch) -> None:
    # `diffq up` serves the bundled model as "shapes"; the README's DIFFQ_MODELS names it too
    monkeypatch.chdir(two_models["alpha"].parent)
    models = f"a={two_models['alpha']},a={two_models['alpha'].name},b={two_models['beta']}"
    assert model_sources(Settings(_env_file=None, models=models)) == {"a": two_models["alpha"], "b": two_models["beta"]}


# -- queue order ---------------------------------------------------------------------------------


def test_loaded_models_come_first_and_a_passed_over_queue_is_served_within_the_bound() -> None:
    chooser = QueueChooser(["a", "b", "c"], switch_after=3)
    waits = {"a": True, "b": True, "c": False}
    taken = []
    for _ in range(10):  # "a" is loaded and its queue never empties; "b" waits from the start
        first = chooser.order(loaded=["a"], waiting=waits)[0]
        taken.append(first)
        chooser.took(first)
    assert taken[:4] == ["a", "a", "a", "b"]  # three runs of "a", then "b" at once
    assert chooser.order(loaded=["b", "a"], waiting={"a": True, "b": True, "c": False})[:2] == ["b", "a"]


def test_with_three_busy_queues_none_waits_longer_than_the_bound() -> None:
    models, switch_after = ["a", "b", "c"], 2
    chooser = QueueChooser(models, switch_after)
    loaded: list[str] = ["a"]
    waited = dict.fromkeys(models, 0)
    worst = 0
    for _ in range(60):  # every queue always has jobs waiting
        first = chooser.order(loaded=loaded, waiting=dict.fromkeys(models, True))[0]
        chooser.took(first)
        loaded = [first, *[m for m in loaded if m != first]][:1]
        for name in models:
            waited[name] = 0 if name == first else waited[name] + 1
            worst = max(worst, waited[name])
    assert worst <= switch_after + len(models) - 2


# -- the cache -----------------------------------------------------------------------------------


def test_the_cache_evicts_the_least_recently_used_beyond_its_budget(two_models: dict[str, Path]) -> None:
    loads: list[str] = []

    def loader(name: str) -> Engine:
        loads.append(name)
        return load(two_models[name])

    one = load(two_models["alpha"]).memory_bytes()
    cache = ModelCache(loader, device_budget=int(one * 1.5))
    cache.get("alpha")
    cache.get("beta")
    assert cache.loaded == ["beta"]
    cache.get("alpha")
    assert loads == ["alpha", "beta", "alpha"] and cache.load_source["alpha"] == "disk"


def test_the_cpu_tier_brings_an_evicted_model_back_without_reading_the_disk(two_models: dict[str, Path]) -> None:
    loads: list[str] = []

    def loader(name: str) -> Engine:
        loads.append(name)
        return load(two_models[name])

    one = load(two_models["alpha"]).memory_bytes()
    cache = ModelCache(loader, device_budget=int(one * 1.5), cpu_budget=int(one * 1.5))
    first = cache.get("alpha")
    cache.get("beta")
    assert cache.parked == ["alpha"]
    assert cache.get("alpha") is first
    assert loads == ["alpha", "beta"] and cache.load_source["alpha"] == "cpu"
    assert cache.parked == ["beta"] and cache.loaded == ["alpha"]


# -- a real worker -------------------------------------------------------------------------------

JOB = {"prompt": "a red circle", "steps": 2, "width": 16, "height": 16}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_worker_with_room_for_one_model_serves_two_without_starving_either(
    two_models: dict[str, Path], redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    switch_after = 2
    budget = int(load(two_models["alpha"]).memory_bytes() * 1.5)
    env = {"DIFFQ_MODELS": f"beta={two_models['beta']}", "DIFFQ_MODEL_MEMORY_BYTES": str(budget),
           "DIFFQ_MODEL_SWITCH_AFTER": str(switch_after), "DIFFQ_BATCH_MAX": "1", "DIFFQ_DEVICE": "cpu",
           "DIFFQ_PREVIEW_DECODER": "off"}
    with services(redis_server.url, tmp_path, worker=two_models["alpha"], ready="/readyz", **env) as stack:
        http = httpx.Client(base_url=stack.url, timeout=30)

        def submit(model: str) -> str:
            response = http.post("/v1/jobs", json={**JOB, "model": model})
            assert response.status_code == 202, response.text
            return response.json()["id"]

        def models() -> dict[str, dict]:
            return {m["name"]: m for m in http.get("/v1/models").json()["models"]}

        wait_for(lambda: set(models()) == {"alpha", "beta"}, timeout=120)
        listed = models()
        assert listed["alpha"]["loaded_on"] and not listed["beta"]["loaded_on"]  # the main model loads last
        assert listed["beta"]["workers"] and listed["beta"]["load_seconds"] > 0

        alpha = [submit("alpha") for _ in range(4)]
        beta = [submit("beta"), submit("beta")]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # keep alpha's queue full until both beta jobs are done
            states = [http.get(f"/v1/jobs/{j}").json()["status"] for j in beta]
            if all(s in ("succeeded", "failed") for s in states):
                break
            queued = sum(http.get(f"/v1/jobs/{j}").json()["status"] == "queued" for j in alpha[-4:])
            alpha += [submit("alpha") for _ in range(max(0, 3 - queued))]
            time.sleep(0.1)
        stack.check_alive()
        alpha += [submit("alpha") for _ in range(2)]  # alpha again: evicted by beta, loaded back
        every = {j: wait_for(lambda j=j: _ended(http, j), timeout=120) for j in alpha + beta}
        assert {job["status"] for job in every.values()} == {"succeeded"}, stack.logs()

        started = {j: datetime.fromisoformat(job["timings"]["started_at"]) for j, job in every.items()}
        created = {j: datetime.fromisoformat(job["timings"]["created_at"]) for j, job in every.items()}
        for b in beta:
            overtaking = [a for a in alpha if created[b] < started[a] < started[b]]
            # The bound (two models): switch_after runs, plus the one already dequeued when b arrived.
            assert len(overtaking) <= switch_after + 1, (b, len(overtaking))
            # ...while alpha, the loaded model, still had jobs waiting: the stream did not run dry.
            assert any(created[a] < started[b] < started[a] for a in alpha), b

        final = models()
        assert final["alpha"]["loaded_on"] and not final["beta"]["loaded_on"]
        assert [w["loaded"] for w in final["beta"]["workers"]] == [False]
        assert final["beta"]["workers"][0]["load_seconds"] > 0


def _ended(http: httpx.Client, job_id: str) -> dict | None:
    job = http.get(f"/v1/jobs/{job_id}").json()
    return job if job["status"] in ("succeeded", "failed", "canceled") else None
