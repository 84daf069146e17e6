"""``/v1/models``: the models live workers serve, with the limits requests are checked against,
which workers have each loaded and which can load it, and how long a load takes."""

from __future__ import annotations

from fastapi import APIRouter

from diffq.app.contract.registry import has_loaded
from diffq.app.deps import RegistryDep, SettingsDep
from diffq.app.schemas.models import ModelList, ModelPublic, WorkerPublic

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList, summary="List served models")
def list_models(registry: RegistryDep, settings: SettingsDep) -> ModelList:
    models = []
    for served in registry.served_models():
        info = served.model
        loads = [w.load_seconds[info.name] for w in served.workers if info.name in w.load_seconds]
        models.append(
            ModelPublic(
                **info.model_dump(exclude={"max_steps", "max_images", "device", "dtype", "scheduler_max_steps"}),
                # The deployment may allow less than the model could take.
                max_steps=(most := min(info.max_steps, settings.max_steps)),
                scheduler_max_steps={name: cap for name, cap in info.scheduler_max_steps.items() if cap < most},
                max_images=min(info.max_images, settings.max_images_per_job),
                workers=[
                    WorkerPublic(
                        id=w.id,
                        device=w.device,
                        dtype=w.dtype,
                        host=w.host,
                        heartbeat_at=w.heartbeat_at,
                        busy=w.current_job is not None,
                        loaded=has_loaded(w, info.name),
                        load_seconds=w.load_seconds.get(info.name),
                    )
                    for w in served.workers
                ],
                loaded_on=[w.id for w in served.workers if has_loaded(w, info.name)],
                load_seconds=max(loads) if loads else None,
            )
        )
    return ModelList(models=models)
