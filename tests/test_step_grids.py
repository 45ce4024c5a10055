"""Step grids: the "logsnr" grid's promises, and upstream's spacing list kept apart from dc_app's."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from dc_app.betas import linear_betas, model_betas
from dc_app.loading.spec import UPSTREAM_SPACINGS, load_model_config, model_defaults
from dc_app.step_grids import TIMESTEP_SPACINGS, ddim_timesteps, grid_timesteps, log_snr, logsnr_timesteps

torch.set_num_threads(1)

N = 1000
LINEAR = (0.00085, 0.012)


def lambdas(zero_snr: bool) -> torch.Tensor:
    return log_snr(torch.cumprod(1.0 - model_betas(*LINEAR, N, zero_snr), 0))


@pytest.mark.parametrize("zero_snr", [True, False])
def test_logsnr_grid_is_valid_for_every_step_count(zero_snr):
    for S in range(1, N + 1):
        ts = logsnr_timesteps(S, *LINEAR, N, zero_snr)
        assert ts.dtype == torch.int64 and len(ts) == S, S
        assert bool((ts.diff() > 0).all()) and int(ts[-1]) == N - 1 and int(ts[0]) >= 0, S
        assert (int(ts[0]) == 0) == (S == N), S  # t = 0 is the final level already: used only when S = N


@pytest.mark.parametrize("zero_snr", [True, False])
@pytest.mark.parametrize("S", [5, 10, 15, 20])  # no repeats to move at these S
def test_logsnr_grid_is_uniform_in_lambda(zero_snr, S):
    """Timesteps 2..S (run order) are the nearest ones to lambda_lo + k (lambda(0) - lambda_lo) / S, k = 1..S-1,
    with lambda_lo the plain schedule's lambda(N-1), for zero-SNR schedules too."""
    lam = lambdas(zero_snr)
    lam_lo = float(log_snr(torch.cumprod(1.0 - linear_betas(*LINEAR, N), 0))[-1])
    assert -2.69 < lam_lo < -2.67 and abs(float(lam[0]) - 3.5347) < 1e-3
    targets = [lam_lo + k * (float(lam[0]) - lam_lo) / S for k in range(1, S)]
    run = logsnr_timesteps(S, *LINEAR, N, zero_snr).flip(0).tolist()
    assert run[0] == N - 1
    for t, target in zip(run[1:], targets):
        nearest = int((lam[1:] - target).abs().argmin()) + 1
        assert t == nearest, (t, nearest, target)
    # zero-SNR: the first step leaves lambda = -inf
    assert (float(lam[N - 1]) == float("-inf")) == zero_snr


def test_grid_timesteps_repairs_upstreams_spacings_and_knows_logsnr():
    assert TIMESTEP_SPACINGS == UPSTREAM_SPACINGS + ("logsnr",)
    assert grid_timesteps("uniform", 36, *LINEAR).tolist()[-2:] == [973, 999]  # upstream's 1000, repaired
    assert grid_timesteps("uniform_trailing", 61, *LINEAR)[0] == 0                 # upstream's -1, repaired
    assert torch.equal(grid_timesteps("logsnr", 12, *LINEAR, N, True), logsnr_timesteps(12, *LINEAR, N, True))
    with pytest.raises(ValueError, match="expected one of uniform, uniform_trailing, logsnr"):
        grid_timesteps("quad", 10, *LINEAR)


def test_upstreams_spacing_list_stays_upstreams():
    """Stock and a yaml's `defaults:` accept upstream's two spacings only."""
    with pytest.raises(ValueError, match="expected one of uniform, uniform_trailing$"):
        ddim_timesteps("logsnr", 10)
    cfg = load_model_config("tiny")
    cfg.defaults = OmegaConf.merge(cfg.get("defaults") or {}, {"timestep_spacing": "logsnr"})
    with pytest.raises(ValueError, match="defaults.timestep_spacing='logsnr'"):
        model_defaults(cfg)


def test_schedule_plot_on_a_grid_stock_cannot_run():
    from dc_app.schedule_view import schedule_view
    from samplerhelpers import StandIn

    table, note = schedule_view(StandIn(), 10, 1.0, "logsnr")
    assert set(table["curve"]) == {"fixed sigma", "fixed 1 - a_prev - sigma^2"} and len(table) == 2 * 10
    assert note.startswith("stock: runs upstream's spacings only (uniform, uniform_trailing), not logsnr.")
