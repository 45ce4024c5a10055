"""DDIM samplers without the real model: upstream's recorded runs replayed, and a cheap stand-in denoiser.

(a) Replay: apply_model returns upstream's recorded UNet outputs, x_T and the step noise are injected; stock
    (and fixed, which is finite there) must give upstream's pred_x0, x_prev and final latent.
(b) Stand-in denoiser over S <= 60 x eta x spacing x buffer dtype x (v, zero-SNR | eps, plain): fixed is
    finite and dtype-independent, equals stock where stock is finite, and stock fails where upstream does.
(c) Interface: variance_noise, callback cancellation, watchdog, RNG order, batched CFG, kwargs.
"""
from __future__ import annotations

import math

import pytest
import torch

from dc_app.loading.spec import load_model_config

from dc_app.sampling import DDIMSampler, FixedDDIMSampler, get_fixed_ddim_sampler
from samplerhelpers import SHAPE, ModelAttrs, StandIn, conds, run

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SPACINGS = ("uniform", "uniform_trailing")
SAMPLERS = {"stock": DDIMSampler, "fixed": FixedDDIMSampler}


def all_nan(x: torch.Tensor) -> bool:
    return bool(x.isnan().all())


def assert_bit_identical(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """torch.equal, with the largest difference in the message when it fails."""
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert torch.equal(got, want), f"{what}: max |difference| {float((got - want).abs().max()):.3g}"


# ------------------------------------------------------------------------------------------ stand-ins


class Replay(ModelAttrs):
    """apply_model returns upstream's recorded UNet output of the current step, cond or uncond by context."""

    def __init__(self, cases, tag: str, tiny_weights):
        self._init_schedule("v", True, torch.float32,
                            {k: tiny_weights[k] for k in ("alphas_cumprod", "sqrt_alphas_cumprod",
                                                          "sqrt_one_minus_alphas_cumprod", "scale_arr")})
        self.c, self.tag, self.step, self.calls = cases, tag, 0, 0
        self.seen_x: list[torch.Tensor] = []

    def rec(self, name):
        return self.c[f"sampler_{self.tag}_{name}"]

    def apply_model(self, x, t, cond, **kw):
        assert set(kw) == {"fs"} and torch.equal(kw["fs"], torch.full((x.shape[0],), 3))
        assert torch.equal(cond["c_concat"][0], self.rec("c_concat").expand(x.shape[0], -1, -1, -1, -1))
        self.calls += 1
        self.seen_x.append(x[:1].clone())
        rows = []
        for r in range(x.shape[0]):
            is_cond = torch.equal(cond["c_crossattn"][0][r], self.rec("cond_crossattn")[0])
            assert is_cond or torch.equal(cond["c_crossattn"][0][r], self.rec("uncond_crossattn")[0])
            rows.append(self.rec("model_out_cond" if is_cond else "model_out_uncond")[self.step][0])
        return torch.stack(rows)


# -------------------------------------------------------------------------------- (a) upstream replay


@pytest.mark.parametrize("batched_cfg", [False, True], ids=["two_calls", "batched"])
@pytest.mark.parametrize("tag", ["eta0", "eta1"])
@pytest.mark.parametrize("name", ["stock", "fixed"])
def test_replay_reproduces_upstream_sampler(name, tag, batched_cfg, cases, cases_meta, tiny_weights):
    model = Replay(cases, tag, tiny_weights)
    meta = cases_meta["meta"]["sampler_runs"][tag]
    steps = []

    def callback(i, n, x_prev, pred_x0):
        assert n == 5 and i == model.step
        steps.append((x_prev.clone(), pred_x0.clone()))
        model.step += 1

    sampler = SAMPLERS[name](model)
    samples, inter = sampler.sample(
        S=5, batch_size=1, shape=(4, 4, 8, 8),
        conditioning={"c_concat": [model.rec("c_concat")], "c_crossattn": [model.rec("cond_crossattn")]},
        unconditional_conditioning={"c_concat": [model.rec("c_concat")],
                                    "c_crossattn": [model.rec("uncond_crossattn")]},
        eta=meta["eta"], x_T=model.rec("x_T"), variance_noise=model.rec("step_noise"),
        unconditional_guidance_scale=7.5, guidance_rescale=0.7, fs=torch.tensor([3]),
        timestep_spacing="uniform_trailing", batched_cfg=batched_cfg, verbose=False, callback=callback,
        cfg_img=None, unconditional_conditioning_img_nonetext=None,  # upstream passes them; ignored
    )
    assert sampler.ddim_timesteps.tolist() == meta["ddim_params"]["ddim_timesteps"] == [199, 399, 599, 799, 999]
    assert model.calls == (5 if batched_cfg else 10)
    # Bit-identical, not merely close: the model outputs, x_T and the noise are upstream's own tensors, and
    # the step is upstream's float32 arithmetic in upstream's order. A change that only moves rounding (a
    # biased std in both places of rescale_noise_cfg moves the final latent by 2e-7 to 5e-7) must fail here.
    # The reference README's atol 1e-3 is for runs through dc_app's own UNet (test_pipeline.py).
    # the model saw upstream's x at every step: x_T, then the recorded x_prev of the previous step
    seen = model.seen_x[:: 1 if batched_cfg else 2]
    assert_bit_identical("x_T seen", seen[0], model.rec("x_T"))
    for i in range(1, 5):
        assert_bit_identical(f"x seen at step {i}", seen[i], model.rec("x_prev")[i - 1])
    assert_bit_identical("pred_x0", torch.stack([s[1] for s in steps]), model.rec("pred_x0"))
    assert_bit_identical("x_prev", torch.stack([s[0] for s in steps]), model.rec("x_prev"))
    assert_bit_identical("final latent", samples, model.rec("final_latent"))
    assert inter["nonfinite"] is None and meta["final_latent_all_finite"]
    # upstream's log policy: x_T, then the first step (index n-1) and index 0
    assert len(inter["x_inter"]) == 3 and torch.equal(inter["x_inter"][-1], samples)


def test_replay_eta1_depends_on_float32_zero(cases, cases_meta, tiny_weights):
    """At S = 5 the float32 argument at t = 999 is exactly +0.0 (float64 would give -1.1e-16 and NaN)."""
    sampler = DDIMSampler(Replay(cases, "eta1", tiny_weights))
    sampler.make_schedule(5, "uniform_trailing", 1.0, verbose=False)
    params = cases_meta["meta"]["sampler_runs"]["eta1"]["ddim_params"]
    f32 = params["one_minus_aprev_minus_sigma2_float32_as_in_sampler"]
    assert sampler.schedule.sqrt_arg.tolist() == f32 and f32[-1] == 0.0
    a_prev, sigma = sampler.ddim_alphas_prev[-1].item(), sampler.ddim_sigmas[-1].item()
    assert 1.0 - a_prev - sigma**2 < 0  # the same expression in float64


# ----------------------------------------------------------------------- (b) stand-in denoiser matrix


def expected_stock_status(schedule_ref, spacing, S, eta, kind, dtype_name) -> str:
    """'error' | 'nan' | 'finite' from upstream's recorded schedule data (not from dc_app's code)."""
    entry = schedule_ref["spacings"][spacing][str(S)]
    if dtype_name == "bfloat16":
        return "type_error"
    if entry["error"]:
        return "index_error"
    if kind == "eps_plain":
        return "finite"  # reference README 4: non-zero-SNR schedules never hit the NaN; no -1 timestep for S <= 60
    if eta == 0.5:
        # 1 - a_prev - (sigma_1 / 2)^2 from upstream's float64 values: far from 0, so float32 keeps it positive
        ref = entry["eta1"]
        margin = min(1 - ap - (s / 2) ** 2 for ap, s in zip(ref["alphas_prev"], ref["sigmas"]))
        assert margin > 1e-4
        return "finite"
    if dtype_name == "float32":
        return "nan" if entry[f"eta{int(eta)}"]["sampler_would_produce_nan_at_indices"] else "finite"
    row = schedule_ref["summary_S_1_to_1000"][f"float16/{spacing}/eta{int(eta)}"]
    return "nan" if str(S) in row["S_where_sampler_sqrt_argument_is_negative_or_nan"]["ddim_indices_by_S"] else "finite"


KINDS = {"v_zero_snr": ("v", True), "eps_plain": ("eps", False)}


def run_plain(sampler, S, eta, spacing):
    """No guidance: one cheap model call per step (guidance is covered by the replay and CFG tests)."""
    cond, _ = conds()
    return sampler.sample(S, 1, SHAPE, conditioning=cond, eta=eta, timestep_spacing=spacing, verbose=False,
                          fs=torch.tensor([24]), generator=torch.Generator().manual_seed(S))


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("kind", list(KINDS))
def test_stand_in_matrix(kind, eta, spacing, schedule_ref):
    """S = 1..60 x buffer dtype for one (kind, eta, spacing): fixed finite and dtype-independent, equal to
    stock wherever stock is finite on float32 buffers; stock's error / NaN / finite status as upstream's."""
    parameterization, zero_snr = KINDS[kind]
    fixed = {name: FixedDDIMSampler(StandIn(parameterization, zero_snr, dt)) for name, dt in DTYPES.items()}
    stock = {name: DDIMSampler(StandIn(parameterization, zero_snr, dt)) for name, dt in DTYPES.items()}
    statuses: dict[str, list] = {}
    for S in range(1, 61):
        out_fixed, inter = run_plain(fixed["float32"], S, eta, spacing)
        assert bool(out_fixed.isfinite().all()) and inter["nonfinite"] is None, S
        for name in DTYPES:
            want = expected_stock_status(schedule_ref, spacing, S, eta, kind, name)
            try:
                out, inter = run_plain(stock[name], S, eta, spacing)
            except IndexError as e:
                assert want == "index_error", (S, name, e)
                assert str(e) == f"{spacing} spacing cannot do {S} steps: timestep 1000 is out of range 0..999"
                continue
            except TypeError as e:
                assert want == "type_error" and "bfloat16" in str(e), (S, name, e)
                continue
            statuses.setdefault(name, []).append((S, want))
            if want == "nan":
                assert all_nan(out), (S, name)
                n = len(stock[name].ddim_timesteps)
                assert inter["nonfinite"] == {"step": 0, "index": n - 1, "timestep": 999, "stage": "x_prev"}, S
            else:
                assert want == "finite" and bool(out.isfinite().all()), (S, name, want)
                assert inter["nonfinite"] is None
                if name == "float32":
                    # docs/nan-fix.md: where stock is finite on float32 buffers, fixed is bit-identical
                    assert torch.equal(out, out_fixed), (S, float((out - out_fixed).abs().max()))
        # fixed ignores the buffers' dtype: the same step coefficients for every S, and the same samples
        # (run in full wherever some dtype breaks stock, and for every third S otherwise)
        stock_breaks = any(expected_stock_status(schedule_ref, spacing, S, eta, kind, d) != "finite"
                           for d in ("float32", "float16"))
        for name in ("float16", "bfloat16"):
            if stock_breaks or S % 3 == 0:
                assert torch.equal(run_plain(fixed[name], S, eta, spacing)[0], out_fixed), (S, name)
            else:
                fixed[name].make_schedule(S, spacing, eta, verbose=False)
            assert torch.equal(fixed[name]._coef, fixed["float32"]._coef), (S, name)
            assert torch.equal(fixed[name]._vcoef, fixed["float32"]._vcoef), (S, name)
    # the matrix is not vacuous: upstream's own failing S show up where expected
    nan32 = [S for S, w in statuses.get("float32", []) if w == "nan"]
    nan16 = [S for S, w in statuses.get("float16", []) if w == "nan"]
    if kind == "v_zero_snr" and spacing == "uniform_trailing" and eta == 1.0:
        assert nan32 == [7, 11, 14, 15, 20, 25, 33, 34, 35, 37, 38, 39]
        assert nan16 == [10, 11, 18, 22, 23, 24, 25]  # float16 buffers move the failures, not remove them
    else:
        assert nan32 == [] and nan16 == []
    assert len(statuses.get("bfloat16", [])) == 0


# ------------------------------------------------------------------------- edge cases of upstream (meta)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_stock_minus_one_timestep_crashes_v_models_like_upstream(eta, cases_meta):
    meta = cases_meta["meta"]["schedule_edge_cases"][f"uniform_trailing_steps61_eta{int(eta)}"]
    sampler = DDIMSampler(StandIn("v", True))
    finite = []
    with pytest.raises(RuntimeError) as err:
        run(sampler, 61, eta, "uniform_trailing",
            callback=lambda i, n, x, p: finite.append(bool(x.isfinite().all())))
    assert sampler.ddim_timesteps.tolist() == meta["ddim_timesteps"]
    assert meta["error"]["type"] == "RuntimeError"
    assert len(finite) == meta["error"]["completed_steps_before_error"] == 61
    assert finite.index(False) == meta["first_nonfinite_step"]["i"]  # 60 at eta 0, 0 at eta 1
    assert not any(finite[finite.index(False):])
    assert "uniform_trailing spacing with 61 steps reaches timestep -1" in str(err.value)
    assert meta["error"]["message"] in str(err.value)
    # fixed: 0 instead of -1, every other timestep kept
    fixed = FixedDDIMSampler(StandIn("v", True))
    out, inter = run(fixed, 61, eta, "uniform_trailing")
    assert fixed.ddim_timesteps.tolist() == [0] + meta["ddim_timesteps"][1:]
    assert bool(out.isfinite().all()) and inter["nonfinite"] is None


def test_stock_minus_one_timestep_leaves_eps_models_all_nan():
    out, inter = run(DDIMSampler(StandIn("eps", False)), 61, 0.0, "uniform_trailing")
    assert all_nan(out)
    assert inter["nonfinite"]["index"] == 1 and inter["nonfinite"]["timestep"] == 15  # sigma at index 1 is NaN


def test_stock_uniform_runs_upstreams_extra_step(cases_meta):
    meta = cases_meta["meta"]["schedule_edge_cases"]["uniform_steps7_eta0"]
    sampler = DDIMSampler(StandIn("v", True))
    seen = []
    out, _ = run(sampler, 7, 0.0, "uniform", callback=lambda i, n, x, p: seen.append(n))
    assert sampler.ddim_timesteps.tolist() == meta["ddim_timesteps"] and seen == [8] * 8
    assert bool(out.isfinite().all()) == meta["decoded_video_all_finite"]


# ---------------------------------------------------------------------------------- (c) the interface


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_variance_noise_length_must_match_the_steps_run(name):
    sampler = SAMPLERS[name](StandIn())
    noise = torch.randn(7, 1, *SHAPE)
    with pytest.raises(ValueError, match="variance_noise has 7 entries but the schedule runs 8 steps"):
        run(sampler, 7, 0.0, "uniform", variance_noise=noise)  # uniform S = 7 runs 8 steps
    with pytest.raises(ValueError, match="variance_noise has 8 entries but the schedule runs 7 steps"):
        run(sampler, 7, 0.0, "uniform_trailing", variance_noise=list(torch.randn(8, 1, *SHAPE)))
    with pytest.raises(ValueError, match=r"variance_noise\[0\] has shape"):
        run(sampler, 7, 0.0, "uniform_trailing", variance_noise=torch.randn(7, 2, *SHAPE))
    out, _ = run(sampler, 7, 1.0, "uniform", variance_noise=torch.randn(8, 1, *SHAPE))
    assert bool(out.isfinite().all())


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_rng_order_is_x_T_then_one_draw_per_step(name, eta):
    """generator (or the global RNG) draws x_T first, then one tensor per step, also at eta = 0."""
    sampler = SAMPLERS[name](StandIn())
    S, n = 8, 8  # finite for both samplers (S = 7 is one of upstream's NaN S)
    g = torch.Generator().manual_seed(123)
    x_T = torch.randn(1, *SHAPE, generator=g)
    noise = [torch.randn(1, *SHAPE, generator=g) for _ in range(n)]
    injected, _ = run(sampler, S, eta, "uniform_trailing", x_T=x_T, variance_noise=noise)
    generated, _ = run(sampler, S, eta, "uniform_trailing", seed=123)
    assert torch.equal(injected, generated)
    torch.manual_seed(123)
    cond, uncond = conds()
    global_rng, _ = sampler.sample(S, 1, SHAPE, conditioning=cond, eta=eta, timestep_spacing="uniform_trailing",
                                   unconditional_guidance_scale=7.5, unconditional_conditioning=uncond,
                                   fs=torch.tensor([24]), guidance_rescale=0.7, verbose=False)
    assert torch.equal(global_rng, generated)
    after = torch.randn(3)
    torch.manual_seed(123)
    for _ in range(1 + n):
        torch.randn(1, *SHAPE)
    assert torch.equal(after, torch.randn(3))  # the global RNG advanced by exactly 1 + n draws


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_variance_noise_is_used_at_eta_zero_too(name):
    # sigma = 0 at eta = 0, so the noise only matters through NaN: a NaN noise gives 0 * NaN = NaN
    noise = torch.full((5, 1, *SHAPE), float("nan"))
    out, inter = run(SAMPLERS[name](StandIn()), 5, 0.0, "uniform_trailing", variance_noise=noise)
    assert all_nan(out) and inter["nonfinite"] == {"step": 0, "index": 4, "timestep": 999, "stage": "x_prev"}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_watchdog_reports_a_non_finite_model_output(name):
    model = StandIn()
    apply = model.apply_model
    model.apply_model = lambda x, t, c, **kw: apply(x, t, c, **kw) * (float("inf") if int(t[0]) == 599 else 1.0)
    out, inter = run(SAMPLERS[name](model), 5, 1.0, "uniform_trailing")  # 199, 399, 599, 799, 999
    assert all_nan(out)
    assert inter["nonfinite"] == {"step": 2, "index": 2, "timestep": 599, "stage": "model_output"}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_raising_stops_within_one_step(name):
    model = StandIn()

    class Stop(Exception):
        pass

    def callback(i, n, x_prev, pred_x0):
        assert n == 20 and x_prev.shape == pred_x0.shape == (1, *SHAPE)
        if i == 2:
            raise Stop

    with pytest.raises(Stop):
        run(SAMPLERS[name](model), 20, 1.0, "uniform_trailing", callback=callback)
    assert model.calls == 3  # steps 0, 1, 2 (one batched CFG call each), nothing after


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("S", [7, 20])
def test_watchdog_off_gives_identical_samples(name, S):
    sampler = SAMPLERS[name](StandIn())
    on, inter_on = run(sampler, S, 1.0, "uniform_trailing")
    off, inter_off = run(sampler, S, 1.0, "uniform_trailing", watchdog=False)
    torch.testing.assert_close(on, off, rtol=0, atol=0, equal_nan=True)
    assert inter_off["nonfinite"] is None
    assert (inter_on["nonfinite"] is not None) == (name == "stock")  # S = 7, 20: upstream's NaN S


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_batched_cfg_equals_two_calls(name, kind):
    model = StandIn(*KINDS[kind])
    sampler = SAMPLERS[name](model)
    batched, _ = run(sampler, 10, 1.0, "uniform_trailing", b=2, batched_cfg=True)
    calls = model.calls
    two, _ = run(sampler, 10, 1.0, "uniform_trailing", b=2, batched_cfg=False)
    assert calls == 10 and model.calls - calls == 20
    assert torch.equal(batched, two)
    # guidance scale 1 or no uncond: a single call per step
    model.calls = 0
    run(sampler, 10, 1.0, "uniform_trailing", unconditional_guidance_scale=1.0)
    run(sampler, 10, 1.0, "uniform_trailing", unconditional_conditioning=None)
    assert model.calls == 20


def test_ignored_and_unsupported_kwargs():
    model = StandIn()
    run(FixedDDIMSampler(model), 3, 1.0, "uniform_trailing", cfg_img=None,
        unconditional_conditioning_img_nonetext={"c_crossattn": [torch.zeros(1)]}, mask=None, x0=None)
    assert all(set(kw) == {"fs"} for kw in model.seen_kwargs)
    with pytest.raises(ValueError, match="mask"):
        run(FixedDDIMSampler(model), 3, 1.0, "uniform_trailing", mask=torch.ones(1))


def test_get_fixed_ddim_sampler_uses_the_models_default_spacing():
    model = StandIn("v", True)
    sampler = get_fixed_ddim_sampler(model, 50, 1.0)
    assert isinstance(sampler, FixedDDIMSampler) and sampler.ddim_timesteps[-1] == 999  # zero-SNR: trailing
    assert len(sampler.ddim_timesteps) == 50 and sampler.schedule.eta == 1.0
    plain = get_fixed_ddim_sampler(StandIn("eps", False), 50, 0.0)
    assert plain.ddim_timesteps.tolist()[:2] == [1, 21]  # "uniform"
    model.config = load_model_config("256")  # the default spacing comes from the model's spec: "uniform"
    assert get_fixed_ddim_sampler(model, 36, 1.0).ddim_timesteps.tolist()[-2:] == [973, 999]  # 1000 repaired
    # sample() remakes the schedule for its own arguments
    run(sampler, 7, 0.0, "uniform")
    assert len(sampler.ddim_timesteps) == 8 and sampler.schedule.eta == 0.0


def test_make_schedule_interface():
    sampler = DDIMSampler(StandIn())
    sampler.make_schedule(ddim_num_steps=5, ddim_discretize="uniform_trailing", ddim_eta=1.0, verbose=False)
    assert sampler.ddim_timesteps.tolist() == [199, 399, 599, 799, 999]
    assert sampler.ddim_sigmas.dtype == torch.float64 and sampler.ddim_alphas.dtype == torch.float32
    assert sampler.ddim_alphas_prev.dtype == torch.float64
    assert sampler.ddim_alphas_prev[0] == sampler.model.alphas_cumprod[0]  # upstream's a_prev[0], not 1
    torch.testing.assert_close(sampler.ddim_sqrt_one_minus_alphas, (1 - sampler.ddim_alphas).sqrt())
    with pytest.raises(ValueError, match="uniform, uniform_trailing"):
        sampler.make_schedule(5, "quad")
    assert math.isclose(float(sampler.ddim_sigmas[-1]), math.sqrt(1 - float(sampler.ddim_alphas_prev[-1])))
