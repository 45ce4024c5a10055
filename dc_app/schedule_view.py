"""The data behind the app's small schedule plot: stock vs fixed sigma and square-root argument per step.

Pure arithmetic from dc_app.schedule, no model run, so the plot follows the sliders instantly. The note
under the plot says in words what the curves cannot show at this scale: a square-root argument of -6e-8
is a flat line at 0 on the plot, and exactly what turns the stock video black.
"""
from __future__ import annotations

import math

import pandas as pd

from .loading.spec import UPSTREAM_SPACINGS
from .schedule import DDPMTables, fixed_ddim_schedule, stock_ddim_schedule
from .stock_failure import StockSamplerFailure

COLUMNS = ("step", "value", "curve")


def _model_tables(model) -> DDPMTables:
    """Stock reads the model's own buffers (whatever dtype they were cast to), as upstream does."""
    return DDPMTables(
        alphas_cumprod=model.alphas_cumprod,
        sqrt_alphas_cumprod=model.sqrt_alphas_cumprod,
        sqrt_one_minus_alphas_cumprod=model.sqrt_one_minus_alphas_cumprod,
        scale_arr=getattr(model, "scale_arr", None),
    )


def _rows(schedule, name: str) -> list[dict]:
    rows = []
    n = len(schedule.timesteps)
    # Run order: step 1 is the noisiest (DDIM index n-1), as the report and the progress bar count.
    for step in range(1, n + 1):
        k = n - step
        values = (("sigma", float(schedule.sigmas[k])), ("1 - a_prev - sigma^2", float(schedule.sqrt_arg[k])))
        for label, value in values:
            if math.isfinite(value):
                rows.append({"step": step, "value": value, "curve": f"{name} {label}"})
    return rows


def _stock_note(schedule) -> str:
    n = len(schedule.timesteps)
    problems = []
    for step in range(1, n + 1):
        k = n - step
        t = int(schedule.timesteps[k])
        arg, sigma = float(schedule.sqrt_arg[k]), float(schedule.sigmas[k])
        if t < 0:
            problems.append(f"step {step} has timestep {t}")
        if math.isnan(sigma):
            problems.append(f"sigma is NaN at step {step} (t={t})")
        elif arg < 0:
            problems.append(f"1 - a_prev - sigma^2 = {arg:.3g} < 0 at step {step} (t={t}): its square root is NaN")
    if not problems:
        return "stock: every step is finite with these settings."
    return "stock: " + "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "") + "."


def schedule_view(model, steps: int, eta: float, spacing: str) -> tuple[pd.DataFrame, str]:
    """-> (long-format table step/value/curve for a line plot, a sentence on where stock breaks)."""
    notes = []
    rows: list[dict] = []
    if spacing not in UPSTREAM_SPACINGS:
        notes.append(f"stock: runs upstream's spacings only ({', '.join(UPSTREAM_SPACINGS)}), not {spacing}.")
    else:
        try:
            stock = stock_ddim_schedule(_model_tables(model), spacing, steps, eta, model.num_timesteps)
            rows += _rows(stock, "stock")
            notes.append(_stock_note(stock))
        except StockSamplerFailure as err:
            notes.append(f"stock: crashes before the first step: {err}.")
    fixed = fixed_ddim_schedule(
        model.linear_start, model.linear_end, model.rescale_betas_zero_snr, spacing, steps, eta,
        model.num_timesteps, model.base_scale if model.use_dynamic_rescale else None,
    )
    rows += _rows(fixed, "fixed")
    notes.append("fixed: the argument is clamped at 0 and every timestep is valid, so every step is finite.")
    return pd.DataFrame(rows, columns=list(COLUMNS)), " ".join(notes)
