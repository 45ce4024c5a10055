"""DDIM schedules against upstream's recorded values (tests/data/tiny/schedule.json, cases.safetensors).

Stock must reproduce upstream bit for bit, failures included; fixed must be valid everywhere and equal to
stock wherever stock works.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dc_app.sampling import DDIMSampler, FixedDDIMSampler
from dc_app.stock_failure import StockSamplerFailure
from dc_app.schedule import (
    DDPMTables,
    config_tables,
    ddim_timesteps,
    fixed_ddim_schedule,
    repair_timesteps,
    stock_ddim_schedule,
)

N = 1000
TINY = dict(linear_start=0.00085, linear_end=0.012, zero_snr=True, base_scale=0.7)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SPACINGS = ("uniform", "uniform_trailing")
F32_ULP_AT_1 = 2.0**-24  # upstream's -5.96e-8


def tiny_tables(tiny_weights, dtype=torch.float32) -> DDPMTables:
    """The tiny model's buffers as `model.half()` / `model.bfloat16()` would leave them."""
    w = tiny_weights
    return DDPMTables(*(w[k].to(dtype) for k in
                        ("alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "scale_arr")))


def same(got: torch.Tensor, want) -> bool:
    """Bit equality of float values, NaN equal to NaN, compared as float64."""
    want = torch.as_tensor(want, dtype=torch.float64)
    got = got.to(torch.float64)
    return got.shape == want.shape and bool(((got == want) | (got.isnan() & want.isnan())).all())


# ----------------------------------------------------------------------------------------- DDPM tables


def test_config_tables_are_the_float32_buffers(tiny_weights):
    tables = config_tables(TINY["linear_start"], TINY["linear_end"], N, True, TINY["base_scale"])
    for name in ("alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "scale_arr"):
        got = getattr(tables, name)
        assert got.dtype == torch.float32
        assert torch.equal(got, tiny_weights[name]), name
    assert tables.alphas_cumprod[-1] == 0.0  # zero terminal SNR, exactly


# ---------------------------------------------------------------------------------- S = 1..60, per value


@pytest.mark.parametrize("spacing", SPACINGS)
def test_timesteps_and_errors_match_upstream(spacing, schedule_ref, tiny_weights):
    tables = tiny_tables(tiny_weights)
    for s, ref in schedule_ref["spacings"][spacing].items():
        S = int(s)
        ts = ddim_timesteps(spacing, S, N)
        assert ts.dtype == torch.int64
        assert ts.tolist() == ref["timesteps"], (spacing, S)
        assert (len(ts) > S) == ref["more_steps_than_requested"]
        if ref["error"] is None:
            stock_ddim_schedule(tables, spacing, S, 1.0)
            continue
        assert ref["error"].startswith("IndexError")
        with pytest.raises(IndexError) as err:
            stock_ddim_schedule(tables, spacing, S, 1.0)
        assert str(err.value) == (f"{spacing} spacing cannot do {S} steps: timestep 1000 is out of range 0..999")
    errors = [int(s) for s, ref in schedule_ref["spacings"][spacing].items() if ref["error"]]
    assert errors == ([3, 9, 27, 36, 37] if spacing == "uniform" else [])


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("eta", ["eta0", "eta1"])
def test_stock_parameters_match_upstream_bit_for_bit(spacing, eta, schedule_ref, tiny_weights):
    tables = tiny_tables(tiny_weights)
    checked = 0
    for s, entry in schedule_ref["spacings"][spacing].items():
        if entry["error"]:
            continue
        ref = entry[eta]
        sch = stock_ddim_schedule(tables, spacing, int(s), float(eta[-1]))
        assert same(sch.sigmas, ref["sigmas"]), (s, "sigmas")
        assert same(sch.alphas, ref["alphas"]), (s, "alphas")
        assert same(sch.alphas_prev, ref["alphas_prev"]), (s, "alphas_prev")
        # returned_types: sigmas float64 torch, alphas float32 torch, alphas_prev float64 numpy -- except S = 1
        # (one step), where upstream's np.asarray([tensor]) keeps float32 and the sigma arithmetic follows.
        dtype = {"torch.float64": torch.float64, "torch.float32": torch.float32}[ref["returned_types"][0].split(":")[1]]
        assert sch.sigmas.dtype == dtype and sch.alphas.dtype == torch.float32
        assert sch.sqrt_arg.dtype == torch.float32
        assert same(sch.sqrt_arg, ref["sampler_f32_one_minus_aprev_minus_sigma2"]), (s, "sqrt argument")
        bad = [i for i, v in enumerate(sch.sqrt_arg.tolist()) if not v >= 0]
        assert bad == ref["sampler_would_produce_nan_at_indices"], s
        assert sch.dir_coef.isnan().nonzero().flatten().tolist() == bad
        scale, scale_prev = (torch.tensor(entry[k], dtype=torch.float32)
                             for k in ("ddim_scale_arr", "ddim_scale_arr_prev"))
        assert torch.equal(sch.scale_ratio, scale_prev / scale)
        checked += 1
    assert checked == (55 if spacing == "uniform" else 60)


def test_one_step_schedule_is_float32_like_upstream(schedule_ref, tiny_weights):
    # A surprise of the reference: with S = 1 upstream's alphas_prev is a float32 array, and sigma with it.
    for spacing in SPACINGS:
        assert schedule_ref["spacings"][spacing]["1"]["eta1"]["returned_types"][0] == "torch.Tensor:torch.float32"
        sch = stock_ddim_schedule(tiny_tables(tiny_weights), spacing, 1, 1.0)
        assert sch.sigmas.dtype == torch.float32 and sch.alphas_prev.dtype == torch.float32


@pytest.mark.parametrize("S", [7, 20, 25])
def test_zero_snr_nan_case_reproduced_by_stock_and_repaired_by_fixed(S, cases, tiny_weights):
    sch = stock_ddim_schedule(tiny_tables(tiny_weights), "uniform_trailing", S, 1.0)
    assert same(sch.sigmas, cases[f"nan_steps{S}_ddim_sigmas"])
    assert same(sch.alphas, cases[f"nan_steps{S}_ddim_alphas"])
    assert same(sch.alphas_prev, cases[f"nan_steps{S}_ddim_alphas_prev"])
    f32 = cases[f"nan_steps{S}_one_minus_aprev_minus_sigma2_f32"]
    assert f32.dtype == torch.float32 and torch.equal(sch.sqrt_arg, f32)
    # The failing value: exactly 0 in float64, -2^-24 in float32, at the first step (index S-1, t = 999).
    assert cases[f"nan_steps{S}_one_minus_aprev_minus_sigma2"][-1] == 0.0
    assert sch.sqrt_arg[-1] == -F32_ULP_AT_1 and sch.timesteps[-1] == 999 and sch.alphas[-1] == 0.0
    assert sch.dir_coef[-1].isnan() and not sch.dir_coef[:-1].isnan().any()

    fixed = fixed_ddim_schedule(TINY["linear_start"], TINY["linear_end"], True, "uniform_trailing", S, 1.0,
                                base_scale=TINY["base_scale"])
    assert torch.equal(fixed.timesteps, sch.timesteps)
    assert fixed.sqrt_arg[-1] == 0.0 and fixed.dir_coef[-1] == 0.0
    assert torch.equal(fixed.sqrt_arg[:-1], sch.sqrt_arg[:-1])
    for name in ("sigmas", "alphas", "alphas_prev", "sqrt_alphas", "sqrt_alphas_prev", "scale_ratio",
                 "sqrt_alphas_cumprod_t", "sqrt_one_minus_alphas_cumprod_t"):
        assert torch.equal(getattr(fixed, name), getattr(sch, name)), name


# ------------------------------------------------------------------------------ S = 1..1000, every row


@pytest.mark.parametrize("row", [f"{d}/{s}/eta{e}" for d in DTYPES for s in SPACINGS for e in (0, 1)])
def test_stock_fails_exactly_where_upstream_does(row, schedule_ref, tiny_weights):
    ref = schedule_ref["summary_S_1_to_1000"][row]
    tables = tiny_tables(tiny_weights, DTYPES[ref["schedule_buffer_dtype"]])
    errors, more, negative, nan_at = {}, {}, {}, {}
    for S in range(1, N + 1):
        try:
            sch = stock_ddim_schedule(tables, ref["timestep_spacing"], S, ref["eta"])
        except (IndexError, TypeError) as e:
            # dc_app marks upstream's failures (StockSamplerFailure) and keeps upstream's exception type as a base.
            assert isinstance(e, StockSamplerFailure), type(e)
            upstream_type = next(c for c in type(e).__mro__ if c.__module__ == "builtins")
            errors.setdefault(upstream_type.__name__, []).append(S)
            if isinstance(e, TypeError):
                assert "bfloat16" in str(e) and "numpy" in str(e)
            continue
        ts = sch.timesteps.tolist()
        if len(ts) > S:
            more[str(S)] = len(ts)
        if min(ts) < 0:
            negative[str(S)] = [t for t in ts if t < 0]
        bad = [i for i, v in enumerate(sch.sqrt_arg.tolist()) if not v >= 0]
        if bad:
            nan_at[str(S)] = bad
    assert errors == {k.split(":")[0]: v["S"] for k, v in ref["errors"].items()}
    assert len(errors) == (ref["num_S_without_error"] < N)
    assert more == ref["S_with_more_steps_than_requested"]["num_returned_by_S"]
    assert negative == ref["S_with_negative_timesteps"]["negative_timesteps_by_S"]
    assert nan_at == ref["S_where_sampler_sqrt_argument_is_negative_or_nan"]["ddim_indices_by_S"]


class ScheduleOnlyModel:
    """What FixedDDIMSampler.make_schedule reads; the buffers are there in `dtype`, poisoned with NaN."""

    parameterization = "v"
    num_timesteps = N
    device = "cpu"

    def __init__(self, zero_snr: bool, dtype: torch.dtype):
        self.linear_start, self.linear_end = TINY["linear_start"], TINY["linear_end"]
        self.rescale_betas_zero_snr = zero_snr
        self.use_dynamic_rescale = zero_snr
        self.base_scale = TINY["base_scale"]
        nan = torch.full((N,), float("nan"), dtype=dtype)
        self.alphas_cumprod = self.sqrt_alphas_cumprod = self.sqrt_one_minus_alphas_cumprod = nan
        self.scale_arr = torch.full((N + 400,), float("nan"), dtype=dtype)


class StockOnlyModel(ScheduleOnlyModel):
    """Float32 buffers as a float32 model holds them (the config's float64 values, cast once)."""

    def __init__(self, zero_snr: bool):
        super().__init__(zero_snr, torch.float32)
        exact = config_tables(TINY["linear_start"], TINY["linear_end"], N, zero_snr, TINY["base_scale"])
        self.alphas_cumprod = exact.alphas_cumprod
        self.sqrt_alphas_cumprod = exact.sqrt_alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = exact.sqrt_one_minus_alphas_cumprod
        self.scale_arr = exact.scale_arr


@pytest.mark.parametrize("zero_snr", [True, False], ids=["zero_snr", "plain"])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_fixed_schedule_is_valid_for_every_setting(spacing, zero_snr, schedule_ref):
    """S = 1..1000 x eta {0, 0.5, 1} x buffer dtype {fp32, fp16, bf16}: valid, distinct timesteps (every
    valid stock timestep kept), a non-negative square-root argument, finite step coefficients and, the
    buffers being NaN, proof that fixed never reads them. Where stock works on float32 buffers, the step
    coefficients and timesteps (all a step uses) are bit-identical to stock's."""
    fixed = [FixedDDIMSampler(ScheduleOnlyModel(zero_snr, dt)) for dt in DTYPES.values()]
    stock = DDIMSampler(StockOnlyModel(zero_snr))
    coefs, sqrt_args = [], []
    n_equal = n_repaired = 0
    for eta in (0.0, 0.5, 1.0):
        for S in range(1, N + 1):
            stock_ts = ddim_timesteps(spacing, S, N)
            for sampler in fixed:
                sampler.make_schedule(S, spacing, eta, verbose=False)
            ref = fixed[0]
            for other in fixed[1:]:
                assert torch.equal(other._coef, ref._coef) and torch.equal(other._vcoef, ref._vcoef), (S, eta)
            coefs += [ref._coef.flatten(), ref._vcoef.flatten()]
            sqrt_args.append(ref.schedule.sqrt_arg)
            ts = ref.schedule.timesteps
            assert len(ts) == len(stock_ts) and ts[0] >= 0 and ts[-1] <= N - 1, (S, eta)
            assert bool((ts[1:] > ts[:-1]).all()), (S, eta)  # ascending, hence distinct
            valid = stock_ts[(stock_ts >= 0) & (stock_ts < N)].numpy()
            assert np.isin(valid, ts.numpy()).all(), (S, eta)
            try:
                stock.make_schedule(S, spacing, eta, verbose=False)
                broken = bool(stock.schedule.timesteps[0] < 0) or not bool((stock.schedule.sqrt_arg >= 0).all())
            except IndexError:
                broken = True
            if broken:
                n_repaired += 1
                continue
            n_equal += 1
            assert torch.equal(stock.ddim_timesteps, ts), (S, eta)
            assert torch.equal(stock._coef, ref._coef) and torch.equal(stock._vcoef, ref._vcoef), (S, eta)
    assert bool(torch.cat(coefs).isfinite().all())
    assert bool((torch.cat(sqrt_args) >= 0).all())
    # Independent count from upstream's summary: S that raise or have a -1 timestep (any eta), plus, for the
    # zero-SNR schedule at eta = 1, the S whose float32 square-root argument is negative.
    at_eta1 = schedule_ref["summary_S_1_to_1000"][f"float32/{spacing}/eta1"]
    broken_s = {int(s) for e in at_eta1["errors"].values() for s in e["S"]}
    broken_s |= {int(s) for s in at_eta1["S_with_negative_timesteps"]["negative_timesteps_by_S"]}
    expected_broken = 3 * len(broken_s)
    if zero_snr:
        nan_s = {int(s) for s in at_eta1["S_where_sampler_sqrt_argument_is_negative_or_nan"]["ddim_indices_by_S"]}
        expected_broken += len(nan_s - broken_s)
    assert n_repaired == expected_broken
    assert n_equal == 3 * N - expected_broken


def test_clamp_only_removes_rounding_error():
    """REPAIR (1) is exact: before the clamp, fixed's float32 argument is never below -2 ulp(1)."""
    from dc_app.schedule import _ddim_parameters

    worst = 0.0
    for zero_snr in (True, False):
        tables = config_tables(TINY["linear_start"], TINY["linear_end"], N, zero_snr, None)
        for spacing in SPACINGS:
            for S in range(1, N + 1, 7):
                ts = repair_timesteps(ddim_timesteps(spacing, S, N), N)
                arg = _ddim_parameters(tables.alphas_cumprod, ts, 1.0)["sqrt_arg"]
                worst = min(worst, float(arg.min()))
    assert -2 * F32_ULP_AT_1 <= worst < 0  # negative somewhere (the zero-SNR t = 999 step), but only just


def test_repair_timesteps_algorithm():
    assert repair_timesteps(torch.tensor([1, 28, 973, 1000])).tolist() == [1, 28, 973, 999]
    assert repair_timesteps(torch.arange(1, 1001)).tolist() == list(range(1000))  # 999 taken -> 0
    assert repair_timesteps(torch.tensor([-1, 15, 32, 999])).tolist() == [0, 15, 32, 999]
    # -1 with 0 taken: the smallest skipped timestep (uniform_trailing S = 998 skips 249 and 749 or so)
    ts = ddim_timesteps("uniform_trailing", 998, N)
    assert ts[0] == -1 and ts[1] == 0
    fixed = repair_timesteps(ts).tolist()
    skipped = sorted(set(range(N)) - set(ts.tolist()))
    assert fixed == sorted(ts.tolist()[1:] + [skipped[0]])
    # repeats count as invalid; ties go to the smaller neighbour
    assert repair_timesteps(torch.tensor([5, 5, 9])).tolist() == [4, 5, 9]
    unchanged = torch.tensor([199, 399, 599, 799, 999])
    assert torch.equal(repair_timesteps(unchanged), unchanged)


def repaired_by_the_rule(values: list[int], n: int) -> tuple[list[int], int]:
    """REPAIR (2) as its docstring states it, written plainly: (the sorted result, how many picks were ties).

    Valid first occurrences stay; every other entry, in input order, takes the free timestep nearest to it,
    the smaller one on a tie."""
    kept: list[int] = []
    replaced: list[int] = []
    for v in values:
        (kept if 0 <= v < n and v not in kept else replaced).append(v)
    free = sorted(set(range(n)) - set(kept))
    picks, ties = [], 0
    for v in replaced:
        pick = min(free, key=lambda c: (abs(c - v), c))
        d = abs(pick - v)
        ties += d > 0 and pick == v - d and v + d in free  # the larger neighbour was just as near, and free
        free.remove(pick)
        picks.append(pick)
    return sorted(kept + picks), ties


def test_repair_timesteps_property_over_random_inputs():
    """Random timesteps with repeats, negatives and values >= N, in any order: the result is distinct and
    valid, keeps every valid first occurrence, and gives each replaced entry the nearest free timestep with
    ties to the smaller. The S = 1..1000 sweep cannot tell the tie rules apart; these inputs can: a repeat
    between two free neighbours is a tie."""
    rng = np.random.default_rng(15)
    ties = 0
    for _ in range(1500):
        n = int(rng.choice([6, 12, 40, N]))
        length = int(rng.integers(1, min(n, 60) + 1))
        # Values from a window narrower than the range (so repeats are common), widened past both ends.
        lo = int(rng.integers(-4, n))
        values = rng.integers(lo, min(lo + max(length, 3), n + 4), size=length).tolist()
        got = repair_timesteps(torch.tensor(values, dtype=torch.int64), n)
        case = (n, values)
        assert got.dtype == torch.int64 and len(got) == length, case
        assert bool((got[1:] > got[:-1]).all()) and 0 <= int(got[0]) and int(got[-1]) < n, case
        assert set(v for v in values if 0 <= v < n) <= set(got.tolist()), case
        want, case_ties = repaired_by_the_rule(values, n)
        assert got.tolist() == want, case
        ties += case_ties
    assert ties > 500  # (876 with this seed) the tie rule was exercised, not just the nearest-timestep rule


def test_schedule_argument_errors():
    with pytest.raises(ValueError, match="uniform, uniform_trailing"):
        ddim_timesteps("quad", 10, N)
    for bad in (0, 1001, 2.5, True):
        with pytest.raises(ValueError, match="1..1000"):
            ddim_timesteps("uniform", bad, N)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fixed_ddim_schedule(0.00085, 0.012, True, "uniform", 10, 1.5)
    assert not math.isnan(fixed_ddim_schedule(0.00085, 0.012, True, "uniform", 10, 1.0).sigmas.sum())
