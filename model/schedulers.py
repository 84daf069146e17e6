"""Schedulers by name: diffq's names for diffusers' sampling algorithms.

The names are part of the public API (clients send them, PNG metadata records
them), so they are short, stable and independent of diffusers' class names.
The algorithms themselves are diffusers' own; nothing here re-implements them.

Importing this module does not import torch or diffusers: the API process
validates scheduler names against `SCHEDULERS` without the model stack.

Every scheduler is built from the model folder's own scheduler config with
`Cls.from_config(base_config, ...)`, so what defines the model's noise
schedule (`prediction_type` such as `v_prediction`, `rescale_betas_zero_snr`,
`timestep_spacing`, `beta_schedule`, ...) carries over to whichever sampler a
request picks.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import SchedulerMixin


#: name -> one-line description, in the order they are offered.
SCHEDULERS: dict[str, str] = {
    "ddim": "DDIM (Song et al. 2020), deterministic; diffusers DDIMScheduler",
    "dpmpp_2m": "DPM-Solver++(2M) (Lu et al. 2022), second-order multistep; good at 20-30 steps",
    "euler": "Euler (Karras et al. 2022, Algorithm 2 without churn); diffusers EulerDiscreteScheduler",
    "euler_a": "Euler ancestral: Euler with fresh noise each step, so images keep changing with steps",
    "unipc": "UniPC (Zhao et al. 2023), unified predictor-corrector; good at 10-20 steps",
    "pndm": "PNDM/PLMS (Liu et al. 2022), pseudo linear multistep; Stable Diffusion 1.x's original sampler",
    "lcm": "Latent Consistency Model sampling (Luo et al. 2023), 2-8 steps; only for LCM-distilled models",
}

#: diffusers class name for each diffq name.
_CLASS_NAMES: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
    "lcm": "LCMScheduler",
}

#: Settings forced on top of the model's config, where a name means one variant
#: of a configurable class: "2M" is DPM-Solver++ of order 2; "pndm" is PLMS as
#: Stable Diffusion uses it, without the Runge-Kutta warm-up steps (which would
#: need more steps than asked for, and fail below 4).
_OVERRIDES: dict[str, dict[str, Any]] = {
    "dpmpp_2m": {"algorithm_type": "dpmsolver++", "solver_order": 2},
    "pndm": {"skip_prk_steps": True},
}

#: Config keys that define what the model's output means at each timestep. A
#: scheduler class that does not accept one of them (set in the model's config)
#: would sample with another noise schedule than the model was trained with, so
#: it is not offered for that model. Example: PNDMScheduler has no
#: `rescale_betas_zero_snr`.
_SCHEDULE_DEFINING_KEYS = ("prediction_type", "rescale_betas_zero_snr")


def scheduler_class(name: str) -> type[SchedulerMixin]:
    """The diffusers class behind a diffq scheduler name (imports diffusers).

    Raises KeyError for a name not in SCHEDULERS: requests are checked before
    (`Engine.validate` raises UnknownSchedulerError).
    """
    import diffusers

    return getattr(diffusers, _CLASS_NAMES[name])


def name_for_scheduler(scheduler: SchedulerMixin) -> str | None:
    """The diffq name of a scheduler instance, or None if no name fits it exactly.

    Used to turn a model folder's scheduler into its default: an
    LCMScheduler folder defaults to "lcm", Stable Diffusion 1.5's PNDMScheduler
    to "pndm". DPMSolverMultistepScheduler is "dpmpp_2m" only when it is
    DPM-Solver++ of order 2.
    """
    for name, class_name in _CLASS_NAMES.items():
        if type(scheduler).__name__ != class_name:
            continue
        overrides = _OVERRIDES.get(name, {})
        if all(scheduler.config.get(key, value) == value for key, value in overrides.items()):
            return name
    return None


def is_compatible(name: str, base_config: Mapping[str, Any]) -> bool:
    """Whether scheduler `name` can honour the noise schedule in `base_config`.

    True unless the model's config sets a schedule-defining key (see
    `_SCHEDULE_DEFINING_KEYS`) that the scheduler's class does not accept.
    """
    parameters = inspect.signature(scheduler_class(name).__init__).parameters
    return all(key in parameters for key in _SCHEDULE_DEFINING_KEYS if base_config.get(key))


def build_scheduler(name: str, base_config: Mapping[str, Any]) -> SchedulerMixin:
    """A fresh scheduler `name` configured from the model's own scheduler config.

    `base_config` is normally `pipe.scheduler.config` of the loaded pipeline.
    Keys the target class does not know (e.g. PNDM's `skip_prk_steps` when
    building DDIM) are dropped by diffusers; keys it knows carry over.
    """
    return scheduler_class(name).from_config(base_config, **_OVERRIDES.get(name, {}))
