"""diffq.model.schedulers: names, classes, and the model's noise schedule carried over to every sampler."""

from __future__ import annotations

import pytest
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from diffq.model.schedulers import (
    SCHEDULERS,
    build_scheduler,
    is_compatible,
    name_for_scheduler,
)

EXPECTED_CLASSES = {
    "ddim": DDIMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "unipc": UniPCMultistepScheduler,
    "pndm": PNDMScheduler,
    "lcm": LCMScheduler,
}


def vpred_zero_snr_config():
    """Like SD 2.x-v / the shapes model: v-prediction, zero terminal SNR, trailing timesteps."""
    return DDIMScheduler(
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        clip_sample=False,
    ).config


def test_names_are_the_public_ones():
    assert list(SCHEDULERS) == ["ddim", "dpmpp_2m", "euler", "euler_a", "unipc", "pndm", "lcm"]
    assert all(isinstance(description, str) and description for description in SCHEDULERS.values())


@pytest.mark.parametrize("name", list(EXPECTED_CLASSES))
def test_build_gives_the_diffusers_class(name):
    scheduler = build_scheduler(name, PNDMScheduler(skip_prk_steps=True).config)
    assert type(scheduler) is EXPECTED_CLASSES[name]


@pytest.mark.parametrize("name", [name for name in SCHEDULERS if name != "pndm"])
def test_noise_schedule_carries_over(name):
    base = vpred_zero_snr_config()
    config = build_scheduler(name, base).config
    assert config.prediction_type == "v_prediction"
    assert config.rescale_betas_zero_snr is True
    assert config.timestep_spacing == "trailing"
    assert config.beta_schedule == "scaled_linear"


def test_pndm_cannot_honour_zero_terminal_snr():
    assert not is_compatible("pndm", vpred_zero_snr_config())
    assert is_compatible("pndm", PNDMScheduler(prediction_type="v_prediction").config)
    assert all(is_compatible(name, vpred_zero_snr_config()) for name in SCHEDULERS if name != "pndm")


def test_dpmpp_2m_is_dpm_solver_plus_plus_of_order_2_whatever_the_base():
    base = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3).config
    config = build_scheduler("dpmpp_2m", base).config
    assert (config.algorithm_type, config.solver_order) == ("dpmsolver++", 2)


def test_pndm_is_plms_whatever_the_base():
    assert build_scheduler("pndm", EulerDiscreteScheduler().config).config.skip_prk_steps is True


@pytest.mark.parametrize(
    "scheduler, expected",
    [
        (PNDMScheduler(skip_prk_steps=True), "pndm"),
        (PNDMScheduler(), None),  # with Runge-Kutta warm-up steps
        (LCMScheduler(), "lcm"),
        (EulerAncestralDiscreteScheduler(), "euler_a"),
        (DPMSolverMultistepScheduler(), "dpmpp_2m"),
        (DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), None),
        (DPMSolverMultistepScheduler(solver_order=3), None),
        (DDPMScheduler(), None),
    ],
)
def test_name_for_scheduler(scheduler, expected):
    assert name_for_scheduler(scheduler) == expected


def test_unknown_name_is_a_key_error():
    # Requests are validated before (Engine.validate raises UnknownSchedulerError).
    with pytest.raises(KeyError):
        build_scheduler("k_lms", DDIMScheduler().config)
