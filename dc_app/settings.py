"""The settings of a generation request: one table of fields, one dataclass, one validation.

Each `Field` row says everything about one setting: its name (the API parameter, the CLI flag, the sidecar key),
what it accepts, where its default comes from, and how the UI shows it. The gr.api signatures
(dc_app.ui_handlers), the UI controls (dc_app.ui) and the CLI flags (dc_app.__main__) are generated from
`FIELDS`, and `GenerationSettings.from_request` validates every field in one place. Adding a setting means one
row here, one attribute on `GenerationSettings`, and the code that uses it.

Defaults come from the model's spec (`ModelDefaults`, read from the yaml's `defaults:` block), never from a
table keyed by a model's name. This module imports no torch, so `python -m dc_app --help` stays quick.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields as dataclass_fields
from typing import Any, Callable, Mapping

from .loading.spec import ModelDefaults
from .sampling import SAMPLER_NAMES, TIMESTEP_SPACINGS
from .validation import (
    InputError,
    choice,
    clean_prompt,
    flag,
    real_number,
    seed_value,
    whole_number,
)

SEED_RANDOM = -1

# One line per choice, shown beside it in the UI (docs/samplers.md has the measurements behind the advice).
SAMPLER_HELP = {
    "fixed": "DDIM, upstream's arithmetic with the NaN repairs (the default; eta 1 is upstream's)",
    "stock": "upstream's DDIM as it is, failures included",
    "dpmpp_2m": "DPM-Solver++(2M): deterministic, 10-15 steps on the logsnr grid",
    "dpmpp_2m_sde": "DPM-Solver++(2M) SDE: eta is its noise scale (eta 0 is dpmpp_2m)",
    "unipc": "UniPC (bh2) with its corrector: deterministic, 10-15 steps on the logsnr grid",
}
SPACING_HELP = {
    "uniform": "evenly spaced timesteps (the 256 model's default)",
    "uniform_trailing": "evenly spaced, ending at t=999 (the zero-SNR models' default)",
    "logsnr": "evenly spaced in log-SNR: made for the multistep samplers",
}


@dataclass(frozen=True)
class Field:
    """One request setting.

    `kind`: text | int | float | seed | choice | flag. `default`: a value, or the name of the `ModelDefaults`
    attribute that holds the model's default. `bounds`: (lo, hi), or the name of a `ModelDefaults` attribute
    holding them (fs). `ui_max`: where the UI slider ends when that is narrower than what the API takes.
    """

    name: str
    kind: str
    label: str
    help: str
    default: Any = None
    model_default: str | None = None
    bounds: tuple[float, float] | None = None
    model_bounds: str | None = None
    choices: tuple[str, ...] = ()
    choice_help: Mapping[str, str] | None = None  # a line per choice, for the UI and --help
    ui_step: float | None = None
    ui_max: float | None = None
    advanced: bool = False
    endpoints: frozenset[str] = frozenset({"generate", "compare", "interpolate", "storyboard", "extend"})
    ui_id: str | None = None      # the control's elem_id where it is not the name spelled with dashes

    @property
    def elem_id(self) -> str:
        return self.ui_id or self.name.replace("_", "-")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def default_for(self, defaults: ModelDefaults) -> Any:
        return getattr(defaults, self.model_default) if self.model_default else self.default

    def bounds_for(self, defaults: ModelDefaults) -> tuple[float, float] | None:
        return tuple(getattr(defaults, self.model_bounds)) if self.model_bounds else self.bounds

    def check(self, value: Any, defaults: ModelDefaults) -> Any:
        """`value` checked and converted; raises InputError naming the field. (Prompts: see from_request.)"""
        if self.kind == "int":
            return whole_number(self.name, value, *self.bounds_for(defaults))
        if self.kind == "float":
            return real_number(self.name, value, *self.bounds_for(defaults))
        if self.kind == "seed":
            return seed_value(value)
        if self.kind == "choice":
            return choice(self.name, value, self.choices)
        if self.kind == "flag":
            return flag(self.name, value)
        raise AssertionError(f"{self.name}: no check for kind {self.kind!r}")

    @property
    def python_type(self) -> type:
        """The type the API advertises for this field."""
        return {"text": str, "int": int, "float": float, "seed": int, "choice": str, "flag": bool}[self.kind]


FIELDS: tuple[Field, ...] = (
    Field("prompt", "text", "Prompt", "what should move, and how", default=""),
    Field("steps", "int", "Sampling steps", "sampler steps, 1-1000", model_default="ddim_steps",
          bounds=(1, 1000), ui_step=1, ui_max=100),
    Field("eta", "float", "eta (DDIM noise)", "DDIM eta: 0 is deterministic, 1 is upstream's default",
          model_default="ddim_eta", bounds=(0.0, 1.0), ui_step=0.05),
    Field("cfg_scale", "float", "CFG scale", "classifier-free guidance scale, 1-15", model_default="cfg_scale",
          bounds=(1.0, 15.0), ui_step=0.5, ui_id="cfg"),
    Field("fs", "int", "fs", "frame stride (256) or fps conditioning (the others), in the model's range",
          model_default="fs", model_bounds="fs_range", ui_step=1),
    Field("seed", "seed", "Seed (-1: random)", "0..2^32-1, or -1 for a random seed", default=SEED_RANDOM),
    Field("frames", "int", "Frames", "video length: the model's trained T frames up to 8T (overlapping windows)",
          model_default="frames", model_bounds="frames_range", ui_step=1,
          endpoints=frozenset({"generate", "compare", "extend"})),  # interpolation keeps its T frames
    Field("guidance_rescale", "float", "Guidance rescale", "phi of arXiv:2305.08891, 0-1",
          model_default="guidance_rescale", bounds=(0.0, 1.0), ui_step=0.05, advanced=True),
    Field("timestep_spacing", "choice", "Timestep spacing", "which timesteps the sampler visits",
          model_default="timestep_spacing", choices=TIMESTEP_SPACINGS, choice_help=SPACING_HELP, advanced=True,
          ui_id="spacing"),
    Field("sampler", "choice", "Sampler",
          "every sampler but stock never gives NaN; compare runs stock beside the one chosen here",
          default="fixed", choices=SAMPLER_NAMES, choice_help=SAMPLER_HELP, advanced=True),
    Field("perframe_ae", "flag", "VAE per-frame decode (less memory)",
          "decode the VAE one frame at a time (less memory)", model_default="perframe_ae", advanced=True,
          ui_id="perframe"),
)
FIELDS_BY_NAME = {f.name: f for f in FIELDS}


def fields_of(endpoint: str) -> tuple[Field, ...]:
    """The settings an endpoint takes, in the table's order (= the API's parameter order after the images)."""
    return tuple(f for f in FIELDS if endpoint in f.endpoints)


@dataclass(frozen=True)
class GenerationSettings:
    """A validated request: every field in range, defaults filled in from the model."""

    prompt: str
    steps: int
    eta: float
    cfg_scale: float
    fs: int
    seed: int
    frames: int
    guidance_rescale: float
    timestep_spacing: str
    sampler: str
    perframe_ae: bool
    notices: tuple[str, ...] = field(default=(), compare=False)  # what the validation changed, for the report

    @classmethod
    def from_request(cls, defaults: ModelDefaults, values: Mapping[str, Any] | None = None, *,
                     num_tokens: Callable[[str], int] | None = None,
                     context_length: int = 77) -> "GenerationSettings":
        """Check every field of `values` (None or absent: the model's default); raises InputError naming the
        field. `num_tokens` is the text encoder's own count, for the notice that a long prompt was cut."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(FIELDS_BY_NAME))
        if unknown:
            raise InputError(f"{unknown[0]}: not a setting; the settings are {', '.join(FIELDS_BY_NAME)}")
        checked: dict[str, Any] = {}
        notices: list[str] = []
        for f in FIELDS:
            value = values.get(f.name)
            if value is None:
                value = f.default_for(defaults)
            if f.kind == "text":
                value, notices = clean_prompt(value, num_tokens, context_length)
            else:
                value = f.check(value, defaults)
            checked[f.name] = value
        return cls(**checked, notices=tuple(notices))

    def as_dict(self) -> dict[str, Any]:
        """The fields by name (no notices): what a sidecar records and `from_request` takes back."""
        return {f.name: getattr(self, f.name) for f in dataclass_fields(self) if f.name != "notices"}


# ------------------------------------------------------------------------------------------------ CLI flags
def add_cli_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per field (`--cfg-scale` for cfg_scale); unset flags keep the model's defaults. The values are
    checked by `GenerationSettings.from_request` like every other front-end's, with the same messages."""
    for f in FIELDS:
        if f.name in skip:
            continue
        shown = f.help + _cli_default(f)
        default = None if f.model_default else f.default  # None: the model's, filled in by from_request
        if f.kind == "flag":
            parser.add_argument(f.flag, action=argparse.BooleanOptionalAction, default=default, help=shown)
        elif f.kind == "choice":
            lines = "; ".join(f"{c}: {f.choice_help[c]}" for c in f.choices) if f.choice_help else ""
            parser.add_argument(f.flag, choices=f.choices, default=default,
                                help=shown + (f". {lines}" if lines else ""))
        else:
            parser.add_argument(f.flag, type={"int": int, "seed": int, "float": float, "text": str}[f.kind],
                                default=default, help=shown)


def _cli_default(f: Field) -> str:
    if f.model_default:
        return " (default: the model's, see the README's model table)"
    return f" (default: {f.default!r})" if f.default not in (None, "") else ""


def cli_values(args: argparse.Namespace) -> dict[str, Any]:
    """The fields given on the command line (unset ones are left out: the model's default applies)."""
    return {f.name: getattr(args, f.name) for f in FIELDS
            if getattr(args, f.name, None) is not None}
