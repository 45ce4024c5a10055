"""Model configs: upstream's inference YAML schema, read with omegaconf, plus dc_app's per-model defaults.

A config is data. Code branches on its values (``parameterization``, ``rescale_betas_zero_snr``,
``use_dynamic_rescale``...), never on a checkpoint's name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).parent / "configs"
MODEL_NAMES = ("256", "512", "1024", "512_interp", "tiny", "tooncrafter_512", "tooncrafter_tiny")
# Test models: no checkpoint exists, they get seeded random weights (dc_app.models.random_init).
RANDOM_WEIGHT_MODELS = ("tiny", "tooncrafter_tiny")
TIMESTEP_SPACINGS = ("uniform", "uniform_trailing")

# What a yaml without a `defaults:` block gets: the 512 model's settings (upstream scripts/run.sh).
_FALLBACK_DEFAULTS = dict(
    hub_repo=None,
    timestep_spacing="uniform_trailing",
    guidance_rescale=0.7,
    fs=24,
    fs_range=[15, 30],
    perframe_ae=True,
    ddim_steps=50,
    ddim_eta=1.0,
    cfg_scale=7.5,
    video_fps=8,
    interp=False,
)


@dataclass(frozen=True)
class ModelDefaults:
    """App-level settings of one model: what upstream's run scripts pass on the command line."""

    hub_repo: str | None        # Hugging Face repo holding model.ckpt (None: no download, e.g. tiny)
    timestep_spacing: str       # DDIM spacing: "uniform" (256) or "uniform_trailing" (512/1024)
    guidance_rescale: float     # phi of "Common Diffusion Noise Schedules are Flawed" (arXiv:2305.08891)
    fs: int                     # default frame stride (256) or fps (512/1024) conditioning value
    fs_range: tuple[int, int]   # inclusive range the UI and API accept
    perframe_ae: bool           # decode the VAE one frame at a time (saves memory on big models)
    ddim_steps: int
    ddim_eta: float
    cfg_scale: float
    video_fps: int              # playback rate of the written mp4 (upstream demo: 8)
    interp: bool                # the model interpolates between a first and a last frame


def load_model_config(name_or_path: Union[str, Path]) -> DictConfig:
    """Return the config for a model name (one of MODEL_NAMES) or an upstream-schema yaml path."""
    key = str(name_or_path)
    if key in MODEL_NAMES:
        path = CONFIG_DIR / f"{key}.yaml"
    else:
        path = Path(key)
        if not path.is_file():
            raise FileNotFoundError(
                f"unknown model {key!r}: expected one of {', '.join(MODEL_NAMES)} or a path to a yaml file"
            )
    cfg = OmegaConf.load(path)
    if "model" not in cfg or "params" not in cfg.model:
        raise ValueError(f"{path}: not an upstream inference config (no model.params block)")
    # Remember where the config came from, for error messages and result sidecars.
    OmegaConf.set_struct(cfg, False)
    cfg.setdefault("name", key if key in MODEL_NAMES else path.stem)
    return cfg


def model_defaults(cfg: DictConfig) -> ModelDefaults:
    """The `defaults:` block of a config, filled in with the 512 model's settings."""
    values = dict(_FALLBACK_DEFAULTS)
    if "defaults" in cfg and cfg.defaults is not None:
        values.update(OmegaConf.to_container(cfg.defaults, resolve=True))
    if values["timestep_spacing"] not in TIMESTEP_SPACINGS:
        raise ValueError(
            f"defaults.timestep_spacing={values['timestep_spacing']!r}: expected one of {TIMESTEP_SPACINGS}"
        )
    lo, hi = (int(v) for v in values["fs_range"])
    values["fs_range"] = (lo, hi)
    return ModelDefaults(**values)
