from __future__ import annotations


import numpy as np
import pytest
import torch

from calid.diffusion.ddim import NoiseSchedule, ddim_loop, interpolate_latent, inversion_grid, sampling_grid, slerp
from calid.models import CaLIDNet, named_config
from calid.models.config import ScheduleConfig

SCHEDULE = NoiseSchedule(ScheduleConfig())
SIGMA = 0.7


def gaussian_denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact noise predictor for latents drawn from N(0, SIGMA^2 I)."""
    a = SCHEDULE.alpha_bar(t, x)
    return (1 - a).sqrt() * x / (a * SIGMA**2 + 1 - a)


def test_schedules_and_grids():
    linear = NoiseSchedule(ScheduleConfig(beta_schedule="linear", beta_start=0.0015, beta_end=0.0195))
    expected = np.linspace(0.0015, 0.0195, 1000)
    np.testing.assert_allclose(linear.betas.numpy(), expected, rtol=1e-12)
    # The paper's (Stable Diffusion's) scaled-linear schedule: linear in sqrt(beta), 0.0015 ... 0.0195 over 1000 steps.
    scaled = NoiseSchedule(ScheduleConfig(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195, num_train_timesteps=1000))
    np.testing.assert_allclose(scaled.betas.numpy(), np.linspace(0.0015**0.5, 0.0195**0.5, 1000) ** 2, rtol=1e-12)
    np.testing.assert_allclose(scaled.alphas_cumprod.numpy(), np.cumprod(1 - np.linspace(0.0015**0.5, 0.0195**0.5, 1000) ** 2), rtol=1e-10)
    assert torch.all(torch.diff(SCHEDULE.alphas_cumprod) < 0)
    grid = sampling_grid(8)
    assert grid[0][0] == 999 and grid[-1][1] == -1 and len(grid) == 8
    assert all(a > b for a, b in grid)
    assert inversion_grid(8) == [(b, a) for a, b in reversed(grid)]
    with pytest.raises(ValueError):
        sampling_grid(0)


@pytest.mark.parametrize("steps", [8, 16])
def test_fixed_point_inversion_is_undone_by_sampling(steps):
    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * SIGMA
    plain = ddim_loop(gaussian_denoiser, ddim_loop(gaussian_denoiser, z, inversion_grid(steps), SCHEDULE), sampling_grid(steps), SCHEDULE)
    inverted = ddim_loop(gaussian_denoiser, z, inversion_grid(steps), SCHEDULE, fixed_point_iterations=5)
    back = ddim_loop(gaussian_denoiser, inverted, sampling_grid(steps), SCHEDULE)
    error = float((back - z).norm() / z.norm())
    assert error < 0.01
    assert error < float((plain - z).norm() / z.norm()) / 10


def test_round_trip_in_every_prediction_parameterisation():
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * SIGMA

    def as_prediction(kind):
        def model(x, t):
            eps = gaussian_denoiser(x, t)
            a = SCHEDULE.alpha_bar(t, x)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            return {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[kind]

        return model

    for kind in ("epsilon", "v_prediction", "sample"):
        model = as_prediction(kind)
        inverted = ddim_loop(model, z, inversion_grid(8), SCHEDULE, kind, fixed_point_iterations=5)
        assert torch.isfinite(inverted).all() and float(inverted.std()) < 3.0, kind
        back = ddim_loop(model, inverted, sampling_grid(8), SCHEDULE, kind)
        assert float((back - z).norm() / z.norm()) < 0.01, kind


def test_plain_inversion_of_an_x0_predictor_stays_finite():
    """Without fixed-point iterations, inverting with an x0-predicting network used to
    divide by sqrt(1 - abar[0]) at the clean end: the inverted latent exploded."""
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * SIGMA

    def constant_x0(x, t):  # a conditional model predicting some other slice than the one inverted
        return torch.zeros_like(x)

    inverted = ddim_loop(constant_x0, z, inversion_grid(4), SCHEDULE, "sample")
    assert torch.isfinite(inverted).all() and float(inverted.abs().max()) < 10 * float(z.abs().max())


def test_slerp_properties():
    generator = torch.Generator().manual_seed(2)
    a = torch.randn(3, 4, 5, generator=generator)
    b = torch.randn(3, 4, 5, generator=generator)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    # equal norms: the interpolant stays on the sphere, halfway in angle
    b_scaled = b / b.flatten(1).norm(dim=1)[:, None, None] * a.flatten(1).norm(dim=1)[:, None, None]
    middle = slerp(a, b_scaled, 0.5)
    torch.testing.assert_close(middle.flatten(1).norm(dim=1), a.flatten(1).norm(dim=1))
    cos = lambda u, v: (u.flatten(1) * v.flatten(1)).sum(1) / (u.flatten(1).norm(dim=1) * v.flatten(1).norm(dim=1))  # noqa: E731
    torch.testing.assert_close(torch.arccos(cos(a, middle)), torch.arccos(cos(middle, b_scaled)), atol=1e-5, rtol=1e-5)
    # nearly parallel: no NaN, equals linear interpolation
    nearly = a * (1 + 1e-9)
    out = slerp(a, nearly, 0.3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, 0.7 * a + 0.3 * nearly)
    # batch entries are independent
    torch.testing.assert_close(slerp(a[:1], b[:1], 0.4), slerp(a, b, 0.4)[:1])


def test_modes_are_deterministic_and_differ():
    config = named_config("tiny")
    torch.manual_seed(0)
    net = CaLIDNet(config).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.02)
    condition = torch.randn(2, 2, 32, 32)
    model = lambda x, t: net(x, t, condition)  # noqa: E731
    z_prev, z_next = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    schedule = NoiseSchedule(config.schedule)
    with torch.no_grad():
        first = interpolate_latent(model, z_prev, z_next, schedule, "calid", 4, torch.Generator().manual_seed(5))
        again = interpolate_latent(model, z_prev, z_next, schedule, "calid", 4, torch.Generator().manual_seed(5))
        other = interpolate_latent(model, z_prev, z_next, schedule, "calid", 4, torch.Generator().manual_seed(6))
        plus = interpolate_latent(model, z_prev, z_next, schedule, "calid+", 4)
        plus_again = interpolate_latent(model, z_prev, z_next, schedule, "calid+", 4)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(plus, plus_again) and not torch.equal(plus, first)
    with pytest.raises(ValueError, match="unknown mode"):
        interpolate_latent(model, z_prev, z_next, schedule, "calid++", 4)
