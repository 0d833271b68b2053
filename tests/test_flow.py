"""The flow-matching core against analytic cases: diffusers' schedule, a Gaussian data
distribution with a closed-form velocity field, torch.distributions, and Monte-Carlo KL."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowopd_lib import flow

# 2-D Gaussian data N(M, C); x_1 ~ N(0, I) independent; x_s = (1 - s) x_0 + s x_1.
M = torch.tensor([1.5, -0.5], dtype=torch.float64)
C = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=torch.float64)
I2 = torch.eye(2, dtype=torch.float64)
N_SAMPLES = 200_000


def affine_velocity(s: float):
    """The exact velocity E[x_1 - x_0 | x_s = x] = A x + c (jointly Gaussian, so affine in x)."""
    cov_s = (1 - s) ** 2 * C + s ** 2 * I2
    A = (s * I2 - (1 - s) * C) @ torch.linalg.inv(cov_s)
    return A, -M - A @ ((1 - s) * M)


def exact_velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    for s in sigma.unique():  # samplers pass one sigma for the whole batch
        A, c = affine_velocity(float(s))
        rows = sigma == s
        out[rows] = (x[rows].double() @ A.T + c).to(x.dtype)
    return out


def chain_moments(sigmas, noise_level):
    """Exact mean and covariance of the discretised sampler's output (Euler / Euler-Maruyama steps
    of an affine field are affine maps plus Gaussian noise, so moments propagate in closed form)."""
    mean, cov = torch.zeros(2, dtype=torch.float64), I2.clone()
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        A, c = affine_velocity(s)
        dt = s_next - s
        if noise_level == 0:
            Mstep, b, var = I2 + dt * A, dt * c, 0.0
        else:
            below = s_next if s >= 1 else s
            sig = noise_level * math.sqrt(s / (1 - below))
            k = sig ** 2 / (2 * s)
            Mstep = I2 + dt * ((1 + k * (1 - s)) * A + k * I2)
            b, var = dt * (1 + k * (1 - s)) * c, sig ** 2 * -dt
        mean, cov = Mstep @ mean + b, Mstep @ cov @ Mstep.T + var * I2
    return mean, cov


def mc_moments(steps, noise_level, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(N_SAMPLES, 2, generator=g)
    x0 = flow.sample(exact_velocity, x1, flow.sigma_schedule(steps), noise_level=noise_level, generator=g)
    return x0.double().mean(0), torch.cov(x0.double().T)


# ----------------------------------------------------------------------------- schedule

@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 10, 40])
def test_schedule_equals_diffusers(shift, steps):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    ours = flow.sigma_schedule(steps, shift)
    assert ours.shape == (steps + 1,)
    assert torch.equal(ours, sched.sigmas)
    assert ours[0] == 1.0 and ours[-1] == 0.0 and torch.all(ours[1:] < ours[:-1])


def test_schedule_rejects_bad_input():
    with pytest.raises(ValueError, match="num_steps=0"):
        flow.sigma_schedule(0)
    with pytest.raises(ValueError, match="shift=-1"):
        flow.sigma_schedule(10, shift=-1)


# ----------------------------------------------------------------------------- samplers on Gaussian data

@pytest.mark.parametrize("noise_level", [0.0, 0.7])
@pytest.mark.parametrize("steps", [10, 40])
def test_samplers_match_the_exact_discrete_chain(steps, noise_level):
    """The sampled moments equal the closed-form moments of the discretised chain: proves each
    step applies exactly the intended drift and noise (a wrong term moves these moments)."""
    mean, cov = mc_moments(steps, noise_level)
    exact_mean, exact_cov = chain_moments(flow.sigma_schedule(steps).double(), noise_level)
    se = (torch.diag(exact_cov) / N_SAMPLES).sqrt()
    assert torch.all((mean - exact_mean).abs() < 5 * se), (mean, exact_mean)
    cov_se = math.sqrt(2 / N_SAMPLES) * exact_cov.abs().max()
    assert (cov - exact_cov).abs().max() < 6 * cov_se, (cov, exact_cov)


@pytest.mark.parametrize("noise_level", [0.0, 0.7])
@pytest.mark.parametrize("steps", [10, 40])
def test_samplers_reproduce_the_data_distribution(steps, noise_level):
    """ODE and SDE both land on the data: mean within Monte-Carlo tolerance at any step count;
    covariance within MC tolerance plus Euler's first-order bias, measured on the exact chain as
    0.25 (ODE) / 0.08 (SDE) at 10 steps and 0.06 / 0.003 at 40 steps for this C."""
    mean, cov = mc_moments(steps, noise_level, seed=1)
    assert (mean - M).abs().max() < 0.02
    euler_bias = {(10, 0.0): 0.26, (10, 0.7): 0.09, (40, 0.0): 0.065, (40, 0.7): 0.01}[(steps, noise_level)]
    assert (cov - C).abs().max() < euler_bias + 0.015


def test_discretisation_bias_shrinks_with_more_steps():
    """Euler's bias vanishes for the ODE. The SDE keeps a small floor (0.005 here at 2000 steps):
    Flow-GRPO's guard at s = 1 makes the first step's noise std ~a regardless of the step size."""
    _, cov_ode = chain_moments(flow.sigma_schedule(2000).double(), 0.0)
    _, cov_sde = chain_moments(flow.sigma_schedule(2000).double(), 0.7)
    assert (cov_ode - C).abs().max() < 2e-3 and (cov_sde - C).abs().max() < 1e-2


def test_sde_with_zero_noise_is_the_ode():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, 3, 4, 4, generator=g)
    for s, s_next in [(1.0, 0.9), (0.5, 0.4), (0.1, 0.0)]:
        step = flow.sde_step(v, x, s, s_next, noise_level=0.0)
        assert torch.allclose(step.prev_sample, flow.ode_step(v, x, s, s_next), atol=1e-6)
        assert torch.isnan(step.log_prob).all()


# ----------------------------------------------------------------------------- log-probs and KL

def _random_step_inputs(seed=0, batch=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 4, 4, generator=g)
    v_a, v_b = torch.randn(batch, 3, 4, 4, generator=g), torch.randn(batch, 3, 4, 4, generator=g)
    sigma = torch.tensor([1.0, 0.9, 0.7, 0.5, 0.3, 0.1])[:batch]
    return x, v_a, v_b, sigma, sigma - 0.1


def test_log_prob_equals_torch_normal():
    x, v, _, sigma, sigma_next = _random_step_inputs()
    step = flow.sde_step(v, x, sigma, sigma_next, generator=torch.Generator().manual_seed(3))
    ref = torch.distributions.Normal(step.mean, step.std.expand_as(step.mean)).log_prob(step.prev_sample)
    assert torch.allclose(step.log_prob, ref.flatten(1).mean(1), atol=1e-5)
    summed = flow.sde_step(v, x, sigma, sigma_next, prev_sample=step.prev_sample, reduce="sum").log_prob
    assert torch.allclose(summed, ref.flatten(1).sum(1), rtol=1e-5)


def test_scoring_a_given_sample_reuses_it():
    x, v, _, sigma, sigma_next = _random_step_inputs()
    drawn = flow.sde_step(v, x, sigma, sigma_next, generator=torch.Generator().manual_seed(1))
    rescored = flow.sde_step(v, x, sigma, sigma_next, prev_sample=drawn.prev_sample)
    assert torch.equal(rescored.prev_sample, drawn.prev_sample)
    assert torch.allclose(rescored.log_prob, drawn.log_prob)


def test_per_sample_sigma_equals_scalar_sigma():
    x, v, _, _, _ = _random_step_inputs()
    noise = torch.randn_like(x)
    batched = flow.sde_step(v, x, torch.full((6,), 0.5), torch.full((6,), 0.4), noise=noise)
    scalar = flow.sde_step(v, x, 0.5, 0.4, noise=noise)
    assert torch.allclose(batched.prev_sample, scalar.prev_sample)
    assert torch.allclose(batched.log_prob, scalar.log_prob)
    with pytest.raises(ValueError, match="one value per sample"):
        flow.sde_step(v, x, torch.full((5,), 0.5), 0.4)


def test_step_kl_equals_gaussian_identity():
    x, v_a, v_b, sigma, sigma_next = _random_step_inputs()
    kl = flow.step_kl(v_a, v_b, x, sigma, sigma_next)
    a = flow.sde_step(v_a, x, sigma, sigma_next, noise=torch.zeros_like(x))
    b = flow.sde_step(v_b, x, sigma, sigma_next, noise=torch.zeros_like(x))
    identity = ((a.mean - b.mean) ** 2 / (2 * a.std ** 2)).flatten(1).sum(1)
    assert torch.allclose(kl, identity, rtol=1e-4)
    dist_a = torch.distributions.Normal(a.mean, a.std.expand_as(a.mean))
    dist_b = torch.distributions.Normal(b.mean, b.std.expand_as(b.mean))
    assert torch.allclose(kl, torch.distributions.kl_divergence(dist_a, dist_b).flatten(1).sum(1), rtol=1e-4)
    assert torch.all(flow.step_kl(v_a, v_a, x, sigma, sigma_next) == 0)


def test_step_kl_equals_monte_carlo_estimate():
    g = torch.Generator().manual_seed(0)
    x, v_a, v_b = (torch.randn(1, 2, 2, 2, generator=g) for _ in range(3))
    v_b = v_a + 0.3 * (v_b - v_a)  # moderate KL keeps the MC variance small
    n = 200_000
    xs, va, vb = x.expand(n, -1, -1, -1), v_a.expand(n, -1, -1, -1), v_b.expand(n, -1, -1, -1)
    a = flow.sde_step(va, xs, 0.6, 0.5, generator=g, reduce="sum")
    b = flow.sde_step(vb, xs, 0.6, 0.5, prev_sample=a.prev_sample, reduce="sum")
    mc = (a.log_prob - b.log_prob).double()
    exact = flow.step_kl(v_a, v_b, x, 0.6, 0.5).double()
    assert abs(mc.mean() - exact) < 5 * mc.std() / math.sqrt(n) + 1e-4


def test_kl_weight_matches_closed_form():
    s, s_next, a = 0.6, 0.5, 0.7
    sig = a * math.sqrt(s / (1 - s))
    expected = 0.1 / 2 * (sig * (1 - s) / (2 * s) + 1 / sig) ** 2
    assert math.isclose(float(flow.kl_weight(s, s_next, a)), expected, rel_tol=1e-6)
    # at s = 1 the next grid point replaces s under the square root (no division by zero)
    assert torch.isfinite(flow.kl_weight(1.0, 0.9, a))


# ----------------------------------------------------------------------------- CFG and the FM loss

def test_cfg():
    u, c = torch.zeros(2, 3), torch.ones(2, 3)
    assert torch.equal(flow.cfg(u, c, 1.0), c)
    assert torch.equal(flow.cfg(u, c, 4.5), 4.5 * c)


def test_fm_loss_is_zero_for_the_exact_velocity_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 3, 4, 4, generator=g)
    noise = torch.randn(16, 3, 4, 4, generator=g)
    exact = lambda x_s, s: noise - x0  # noqa: E731 - an oracle that knows the pairing
    out = flow.fm_loss(exact, x0, noise=noise, generator=g)
    assert out.loss.item() < 1e-10 and out.per_sample.shape == (16,) and torch.all((out.sigma > 0) & (out.sigma < 1))
    wrong = flow.fm_loss(lambda x_s, s: torch.zeros_like(x_s), x0, noise=noise, generator=g)
    assert torch.allclose(wrong.loss, ((noise - x0) ** 2).mean())


def test_fm_loss_trains_a_velocity_field():
    """minRF in miniature: a linear field fitted by the FM loss samples the data mean."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    field = lambda x, s: net(torch.cat([x, s[:, None]], 1))  # noqa: E731
    for _ in range(400):
        x0 = M.float() + 0.3 * torch.randn(256, 2)
        loss = flow.fm_loss(field, x0, sigma_sampling="uniform").loss
        opt.zero_grad(); loss.backward(); opt.step()  # noqa: E702
    samples = flow.sample(field, torch.randn(4096, 2), flow.sigma_schedule(20))
    assert (samples.mean(0) - M.float()).abs().max() < 0.1


def test_loss_per_noise_bin():
    bins = flow.loss_per_noise_bin(torch.tensor([0.05, 0.15, 0.95]), torch.tensor([1.0, 3.0, 5.0]), num_bins=5)
    assert bins == {"loss_bin/0.0-0.2": 2.0, "loss_bin/0.8-1.0": 5.0}
