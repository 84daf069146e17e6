"""``/v1/models``: the models live workers serve, with the limits requests are checked against."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import RegistryDep, SettingsDep
from app.schemas.models import ModelList, ModelPublic, WorkerPublic

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList, summary="List served models")
def list_models(registry: RegistryDep, settings: SettingsDep) -> ModelList:
    models = []
    for served in registry.served_models():
        info = served.model
        models.append(
            ModelPublic(
                **info.model_dump(exclude={"max_steps", "max_images", "device", "dtype"}),
                # The deployment may allow less than the model could take.
                max_steps=min(info.max_steps, settings.max_steps),
                max_images=min(info.max_images, settings.max_images_per_job),
                workers=[
                    WorkerPublic(
                        id=w.id,
                        device=w.device,
                        dtype=w.dtype,
                        host=w.host,
                        heartbeat_at=w.heartbeat_at,
                        busy=w.current_job is not None,
                    )
                    for w in served.workers
                ],
            )
        )
    return ModelList(models=models)
