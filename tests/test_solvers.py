"""The multistep solvers and samplers: order of accuracy, equivalences, the failure matrix, the interface.

(a) Solver functions on a continuous log-SNR grid with the exact Gaussian denoiser: observed order over
    S = 20..200 (DDIM 1, DPM-Solver++(2M) 2, UniPC 3); agreement with diffusers' schedulers (stored outputs).
(b) Equivalences: the first-order solver on the samplers' levels is the fixed DDIM sampler at eta 0 (dynamic
    rescale included); dpmpp_2m_sde at eta 0 is dpmpp_2m.
(c) Failure matrix: coefficients finite and bounded for S = 1..1000 x every grid x {zero-SNR with dynamic
    rescale, plain} x eta; stand-in runs finite for S <= 60, without ever reading the model's buffers.
(d) Interface: callback, cancellation, watchdog, notices, variance_noise, batched CFG, refused settings.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dc_app.multistep import MULTISTEP_SOLVERS, MultistepSampler, solver_levels
from dc_app.sampling import SAMPLER_NAMES, TIMESTEP_SPACINGS, FixedDDIMSampler, make_sampler
from dc_app.schedule import fixed_ddim_schedule
from dc_app.solvers import (
    dpmpp_2m_sde_coefficients,
    sample_ddim,
    sample_dpmpp_2m,
    sample_unipc,
    step_ratios,
    unipc_corrector_coefficients,
)
from gaussian_model import GaussianData, continuous_levels, solve
from samplerhelpers import SHAPE, TINY, StandIn, conds, run

torch.set_num_threads(1)

N = 1000
REFERENCE = Path(__file__).parent / "data" / "solvers" / "diffusers_reference.safetensors"
SOLVER_FUNCTIONS = {"ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m, "unipc": sample_unipc}
KINDS = {"v_zero_snr": ("v", True), "eps_plain": ("eps", False)}


def observed_order(errors: dict[int, float]) -> float:
    """Least-squares slope of -log(error) against log(S)."""
    xs = [math.log(S) for S in errors]
    ys = [-math.log(e) for e in errors.values()]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


# ------------------------------------------------------------------------------ (a) order of accuracy


@pytest.mark.parametrize("name, order", [("ddim", 1.0), ("dpmpp_2m", 2.0), ("unipc", 3.0)])
def test_observed_order_on_a_continuous_logsnr_grid(name, order):
    """Uniform in lambda from -2.7 to 3.5 (the 256 schedule's range), no rounding. UniPC-2 with its corrector
    is third order (the corrector raises the order by one, Zhao et al. 2023, sec. 3.3); measured 2.98."""
    data = GaussianData(0)
    errors = {S: solve(SOLVER_FUNCTIONS[name], data, *continuous_levels(S)) for S in (20, 40, 80, 120, 200)}
    tolerance = 0.3 if order == 1.0 else 0.4
    assert abs(observed_order(errors) - order) <= tolerance, errors
    # and every error shrinks with more steps
    values = list(errors.values())
    assert all(a > b for a, b in zip(values, values[1:])), errors


def test_unipc_predictor_alone_is_second_order():
    """Without its corrector UniPC-2 (bh2) is DPM-Solver++(2M): the same predictor coefficients."""
    alphas, sigmas = continuous_levels(30)
    coefs = dpmpp_2m_sde_coefficients(alphas, sigmas, 0.0)
    corrector = unipc_corrector_coefficients(alphas, sigmas)
    assert coefs.shape == corrector.shape == (30, 4)
    # the corrector's weights reproduce x0 exactly for a constant denoiser: c_0 + c_1 + c_next = A
    gain = alphas[1:] * (1 - step_ratios(alphas, sigmas))
    torch.testing.assert_close(corrector[:, 1:].sum(1), gain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(coefs[:, 1] + coefs[:, 2], gain, rtol=1e-12, atol=1e-12)


def test_solvers_match_diffusers_on_a_plain_schedule():
    """diffusers 0.42.1's DPMSolverMultistepScheduler (dpmsolver++, order 2) and UniPCMultistepScheduler (bh2,
    order 2, lower_order_final=False), final_sigmas_type="sigma_min", on the 256 schedule with v-prediction,
    trailing, 20 steps, driven by the exact Gaussian denoiser (tests/data/solvers/make_reference.py)."""
    ref = load_file(str(REFERENCE))
    data = GaussianData(0)
    assert torch.equal(data.mu, ref["mu"]) and torch.equal(data.s, ref["s"])
    alphas, sigmas = ref["alphas"], ref["sigmas"]
    for name, fn in (("dpmpp_2m", sample_dpmpp_2m), ("unipc", sample_unipc)):
        out = fn(lambda x, i: data.denoise(x, float(alphas[i]), float(sigmas[i])), ref["x_T"].clone(), alphas, sigmas)
        # diffusers keeps its sigmas in float32: agreement to ~1e-6 of values ~3
        torch.testing.assert_close(out, ref[f"out_{name}"], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ (b) equivalences


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_first_order_solver_is_fixed_ddim_at_eta_zero(kind, spacing):
    """DDIM with DynamiCrafter's dynamic rescale is the first-order step on levels alpha s(t): the mapping
    dc_app/multistep.py uses for every solver."""
    model = StandIn(*KINDS[kind])
    fixed = FixedDDIMSampler(model)
    ddim, _ = run(fixed, 12, 0.0, spacing)
    cond, uncond = conds()
    first_order = MultistepSampler(model, "ddim")
    out, inter = first_order.sample(12, 1, SHAPE, conditioning=cond, eta=0.0, timestep_spacing=spacing,
                                    unconditional_guidance_scale=7.5, unconditional_conditioning=uncond,
                                    fs=torch.full((1,), 24), guidance_rescale=0.7 if kind == "v_zero_snr" else 0.0,
                                    x_T=torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(0)),
                                    verbose=False)
    assert first_order.ddim_timesteps.tolist() == fixed.ddim_timesteps.tolist()
    torch.testing.assert_close(out, ddim, rtol=1e-5, atol=1e-5)
    assert inter["nonfinite"] is None


def test_sde_at_eta_zero_is_2m():
    model = StandIn("v", True)
    out_2m, _ = run(make_sampler("dpmpp_2m", model), 15, 0.0, "logsnr")
    out_sde, _ = run(make_sampler("dpmpp_2m_sde", model), 15, 0.0, "logsnr")
    assert torch.equal(out_2m, out_sde)


# ---------------------------------------------------------------------------------- (c) failure matrix


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("zero_snr", [True, False], ids=["zero_snr_rescaled", "plain"])
def test_coefficients_finite_and_bounded_for_every_step_count(zero_snr, spacing):
    """S = 1..1000: levels valid (rising log-SNR, first alpha 0 only for zero SNR) and every coefficient of
    every solver finite and small enough for float16 latents."""
    base_scale = TINY["base_scale"] if zero_snr else None
    worst = 0.0
    for S in range(1, N + 1):
        lv = solver_levels(TINY["linear_start"], TINY["linear_end"], zero_snr, spacing, S, N, base_scale)
        assert len(set(lv.run_timesteps)) == len(lv.run_timesteps) and min(lv.run_timesteps) >= 0, S
        # "uniform" starts where upstream's does (1 + (S - 1) (N div S), or N-1 once repaired); the others at N-1
        assert spacing == "uniform" or lv.run_timesteps[0] == N - 1, S
        assert (float(lv.alphas[0]) == 0.0) == (zero_snr and lv.run_timesteps[0] == N - 1), S
        tables = [dpmpp_2m_sde_coefficients(lv.alphas, lv.sigmas, eta) for eta in (0.0, 0.5, 1.0)]
        tables.append(unipc_corrector_coefficients(lv.alphas, lv.sigmas))
        for table in tables:
            assert bool(torch.isfinite(table).all()), S
            worst = max(worst, float(table.abs().max()))
        assert all(s > 0 for s in lv.sigma_t) and all(a > 0 for a in lv.alpha_t[1:]), S
    assert worst < 10.0, worst  # measured 3.4 (plain, trailing, S = 15)


@pytest.mark.parametrize("name", list(MULTISTEP_SOLVERS))
@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_stand_in_matrix(kind, spacing, name):
    """S = 1..60, eta 0 and 1: finite with the watchdog silent; a model without schedule buffers gives the same
    samples, so float16 / bfloat16 buffers cannot change anything."""
    parameterization, zero_snr = KINDS[kind]
    model = StandIn(parameterization, zero_snr)
    bare = StandIn(parameterization, zero_snr)
    for buffer in ("alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "scale_arr"):
        delattr(bare, buffer)
    etas = (0.0, 1.0) if name == "dpmpp_2m_sde" else (1.0,)
    cond, _ = conds()
    for S in range(1, 61):
        for eta in etas:
            kw = dict(conditioning=cond, eta=eta, timestep_spacing=spacing, verbose=False, fs=torch.tensor([24]))
            out, inter = make_sampler(name, model).sample(S, 1, SHAPE, generator=torch.Generator().manual_seed(S), **kw)
            assert bool(out.isfinite().all()) and inter["nonfinite"] is None, (S, eta)
            if S % 7 == 0:
                again, _ = make_sampler(name, bare).sample(S, 1, SHAPE, generator=torch.Generator().manual_seed(S), **kw)
                assert torch.equal(out, again), (S, eta)


@pytest.mark.parametrize("zero_snr", [True, False], ids=["zero_snr_rescaled", "plain"])
def test_fixed_ddim_on_the_logsnr_grid(zero_snr):
    """fixed takes dc_app's grid too: S = 1..1000 coefficients finite at eta 0 and 1, S <= 60 runs finite."""
    base_scale = TINY["base_scale"] if zero_snr else None
    for S in range(1, N + 1):
        for eta in (0.0, 1.0):
            sch = fixed_ddim_schedule(TINY["linear_start"], TINY["linear_end"], zero_snr, "logsnr", S, eta, N, base_scale)
            finite = [sch.sigmas, sch.dir_coef] + ([sch.scale_ratio] if zero_snr else [])
            assert all(bool(torch.isfinite(v).all()) for v in finite) and bool((sch.sqrt_arg >= 0).all()), (S, eta)
    model = StandIn(*(("v", True) if zero_snr else ("eps", False)))
    cond, _ = conds()
    for S in range(1, 61):
        out, inter = make_sampler("fixed", model).sample(S, 1, SHAPE, conditioning=cond, eta=1.0, timestep_spacing="logsnr",
                                                         verbose=False, generator=torch.Generator().manual_seed(S))
        assert bool(out.isfinite().all()) and inter["nonfinite"] is None, S


# ---------------------------------------------------------------------------------- (d) the interface


def test_registry():
    assert SAMPLER_NAMES == ("fixed", "stock", "dpmpp_2m", "dpmpp_2m_sde", "unipc")
    assert TIMESTEP_SPACINGS == ("uniform", "uniform_trailing", "logsnr")
    model = StandIn()
    assert isinstance(make_sampler("unipc", model), MultistepSampler)
    with pytest.raises(ValueError, match="sampler 'ddpm': expected one of fixed, stock, dpmpp_2m"):
        make_sampler("ddpm", model)


def test_stock_keeps_upstreams_two_spacings_every_other_sampler_takes_logsnr():
    with pytest.raises(ValueError, match="expected one of uniform, uniform_trailing$"):
        run(make_sampler("stock", StandIn()), 10, 1.0, "logsnr")
    for name in SAMPLER_NAMES:
        if name != "stock":
            sampler = make_sampler(name, StandIn())
            out, inter = run(sampler, 10, 1.0, "logsnr")
            assert bool(out.isfinite().all()) and inter["nonfinite"] is None, name
            assert sampler.ddim_timesteps.tolist() == [2, 10, 34, 97, 222, 393, 564, 704, 807, 999], name


@pytest.mark.parametrize("name", list(MULTISTEP_SOLVERS))
def test_callback_every_step_and_cancellation(name):
    model = StandIn()
    seen = []
    run(make_sampler(name, model), 12, 0.0, "logsnr", callback=lambda i, n, x, p: seen.append((i, n, x.shape)))
    assert seen == [(i, 12, (1, *SHAPE)) for i in range(12)] and model.calls == 12  # one batched CFG call a step

    class Stop(Exception):
        pass

    def stop_at_two(i, n, x, p):
        if i == 2:
            raise Stop

    model.calls = 0
    with pytest.raises(Stop):
        run(make_sampler(name, model), 12, 0.0, "logsnr", callback=stop_at_two)
    assert model.calls == 3


@pytest.mark.parametrize("name", list(MULTISTEP_SOLVERS))
def test_watchdog_names_the_first_bad_step(name):
    model = StandIn()
    apply = model.apply_model
    model.apply_model = lambda x, t, c, **kw: apply(x, t, c, **kw) * (float("nan") if int(t[0]) == 393 else 1.0)
    out, inter = run(make_sampler(name, model), 10, 0.0, "logsnr")  # 999, 807, 704, 564, 393, ...
    assert inter["nonfinite"] == {"step": 4, "index": 5, "timestep": 393, "stage": "model_output"}
    off, inter_off = run(make_sampler(name, model), 10, 0.0, "logsnr", watchdog=False)
    assert inter_off["nonfinite"] is None and torch.equal(out.isnan(), off.isnan())


def test_notices_for_an_ignored_eta():
    for name in ("dpmpp_2m", "unipc"):
        sampler = make_sampler(name, StandIn())
        _, inter = run(sampler, 5, 1.0, "logsnr")
        assert sampler.notices == inter["notices"] == [
            f"eta=1 is ignored: {name} is deterministic (dpmpp_2m_sde is its stochastic counterpart)"]
        _, inter = run(sampler, 5, 0.0, "logsnr")
        assert sampler.notices == inter["notices"] == []
    sde = make_sampler("dpmpp_2m_sde", StandIn())
    run(sde, 5, 1.0, "logsnr")
    assert sde.notices == []
    assert make_sampler("fixed", StandIn()).notices == []


def test_sde_noise_injection_and_rng_order():
    """variance_noise[i] replaces the draw of step i; without it: x_T then one draw per step from `generator`."""
    sampler = make_sampler("dpmpp_2m_sde", StandIn())
    g = torch.Generator().manual_seed(7)
    x_T = torch.randn(1, *SHAPE, generator=g)
    noise = [torch.randn(1, *SHAPE, generator=g) for _ in range(9)]
    injected, _ = run(sampler, 9, 0.8, "logsnr", x_T=x_T, variance_noise=noise)
    drawn, _ = run(sampler, 9, 0.8, "logsnr", seed=7)
    assert torch.equal(injected, drawn)
    other, _ = run(sampler, 9, 0.8, "logsnr", seed=8)
    assert not torch.allclose(other, drawn)
    with pytest.raises(ValueError, match="variance_noise has 8 entries but the schedule runs 9 steps"):
        run(sampler, 9, 0.8, "logsnr", variance_noise=noise[:8])
    with pytest.raises(ValueError, match="dpmpp_2m is deterministic"):
        run(make_sampler("dpmpp_2m", StandIn()), 9, 0.0, "logsnr", variance_noise=noise)


@pytest.mark.parametrize("name", list(MULTISTEP_SOLVERS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_batched_cfg_equals_two_calls(name, kind):
    model = StandIn(*KINDS[kind])
    batched, _ = run(make_sampler(name, model), 8, 0.5, "logsnr", b=2, batched_cfg=True)
    two, _ = run(make_sampler(name, model), 8, 0.5, "logsnr", b=2, batched_cfg=False)
    assert model.calls == 8 + 16
    torch.testing.assert_close(batched, two, rtol=0, atol=0)


def test_refused_settings():
    with pytest.raises(ValueError, match="eps-prediction model cannot be sampled on a zero-terminal-SNR"):
        run(make_sampler("unipc", StandIn("eps", True)), 5, 0.0, "logsnr")
    with pytest.raises(ValueError, match=r"eta=1.5: expected a value in \[0, 1\]"):
        run(make_sampler("dpmpp_2m_sde", StandIn()), 5, 1.5, "logsnr")
    with pytest.raises(ValueError, match="timestep_spacing='quad'"):
        run(make_sampler("dpmpp_2m", StandIn()), 5, 0.0, "quad")
    with pytest.raises(ValueError, match="mask"):
        run(make_sampler("dpmpp_2m", StandIn()), 5, 0.0, "logsnr", mask=torch.ones(1))
