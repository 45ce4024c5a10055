"""Model configs: upstream's inference YAML schema, read with omegaconf, plus dc_app's `ModelSpec`.

A config is data. Code branches on its values (``parameterization``, ``rescale_betas_zero_snr``,
``use_dynamic_rescale``, ``weights.random_seed``...), never on a checkpoint's name.

dc_app's yamls add two blocks to upstream's schema; they are the one source of what the app knows about a model:
* ``weights:`` where the checkpoint comes from: ``hub_repo`` and ``hub_file`` on the Hugging Face Hub, the
  ``local_checkpoint`` path under checkpoints/ (upstream's layout), or ``random_seed`` for test models with
  seeded random weights and no checkpoint at all;
* ``defaults:`` the request defaults and the model's serving facts (what upstream's run scripts pass on the
  command line, the fs range and meaning, the mp4's fps, whether it interpolates).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Union

from omegaconf import DictConfig, OmegaConf

from ..windows import MAX_LENGTH_FACTOR

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
MODEL_NAMES = ("256", "512", "1024", "512_interp", "tiny", "tiny_interp", "tooncrafter_512",
               "tooncrafter_tiny")
# Upstream's DDIM spacings: what the stock sampler and a yaml's `defaults:` accept. dc_app's samplers accept
# more (dc_app.sampling.TIMESTEP_SPACINGS); keeping the two lists apart means neither stock nor a yaml file
# starts accepting a new grid by accident.
UPSTREAM_SPACINGS = ("uniform", "uniform_trailing")
FS_MEANINGS = ("frame stride", "fps")


@dataclass(frozen=True)
class ModelDefaults:
    """A model's request defaults and serving facts: the yaml's `defaults:` block, every key required."""

    timestep_spacing: str       # DDIM spacing: "uniform" (256) or "uniform_trailing" (512/1024)
    guidance_rescale: float     # phi of "Common Diffusion Noise Schedules are Flawed" (arXiv:2305.08891)
    fs: int                     # default frame stride (256) or fps (512/1024) conditioning value
    fs_range: tuple[int, int]   # inclusive range the UI and API accept
    fs_meaning: str             # "frame stride" or "fps": what the fs number conditions on
    perframe_ae: bool           # decode the VAE one frame at a time (saves memory on big models)
    ddim_steps: int
    ddim_eta: float
    cfg_scale: float
    video_fps: int              # playback rate of the written mp4 (upstream demo: 8)
    interp: bool                # the model interpolates between a first and a last frame
    seconds_per_step: float     # rough seconds per step (two UNet passes) on one H100: ZeroGPU's time estimate
    # Not read from the yaml: model_spec derives them from the architecture (the UNet's temporal_length).
    frames: int = 16                        # the default frame count: the one the model was trained on, T
    frames_range: tuple[int, int] = (16, 16)  # T..8T for image-to-video (windowed), exactly T to interpolate

    def with_values(self, **values: Any) -> "ModelDefaults":
        return replace(self, **values)


@dataclass(frozen=True)
class ModelSpec:
    """Everything the yaml says about a model besides its architecture."""

    name: str
    hub_repo: str | None         # Hugging Face repo holding the checkpoint (None: no download)
    hub_file: str                # the checkpoint's file name in that repo
    local_checkpoint: str | None  # path under checkpoints/ (or $DC_APP_CHECKPOINTS) used instead when present
    random_seed: int | None      # test models: seeded random weights instead of a checkpoint
    latent_size: tuple[int, int]  # (h, w) of the latent; the video is 8x that
    frames: int                  # the frame count the model was trained on
    defaults: ModelDefaults
    temporal_decoder: bool = False  # the VAE decodes `frames` frames together (ToonCrafter's dual-reference one)

    @property
    def random_weights(self) -> bool:
        return self.random_seed is not None

    @property
    def frame_size(self) -> tuple[int, int]:
        return 8 * self.latent_size[0], 8 * self.latent_size[1]

    @property
    def interp(self) -> bool:
        return self.defaults.interp


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


def _block(cfg: DictConfig, key: str) -> dict:
    block = cfg.get(key)
    if block is None:
        raise ValueError(
            f"model {cfg.get('name', '?')}: the config has no `{key}:` block; dc_app needs one (copy it from "
            f"dc_app/configs/512.yaml and adapt it)"
        )
    return OmegaConf.to_container(block, resolve=True)


def model_defaults(cfg: DictConfig) -> ModelDefaults:
    """The config's `defaults:` block, checked: every key present, spacing and fs meaning known."""
    values = _block(cfg, "defaults")
    names = [f.name for f in fields(ModelDefaults) if f.name not in _DERIVED]
    missing, unknown = [n for n in names if n not in values], sorted(set(values) - set(names))
    if missing or unknown:
        raise ValueError(f"model {cfg.get('name', '?')}: defaults block: missing {missing}, unknown {unknown}")
    if values["timestep_spacing"] not in UPSTREAM_SPACINGS:
        raise ValueError(
            f"defaults.timestep_spacing={values['timestep_spacing']!r}: expected one of {UPSTREAM_SPACINGS}"
        )
    if values["fs_meaning"] not in FS_MEANINGS:
        raise ValueError(f"defaults.fs_meaning={values['fs_meaning']!r}: expected one of {FS_MEANINGS}")
    lo, hi = (int(v) for v in values["fs_range"])
    values["fs_range"] = (lo, hi)
    return ModelDefaults(**values)


_DERIVED = ("frames", "frames_range")  # ModelDefaults fields that come from the architecture, not the yaml


def model_spec(cfg: DictConfig) -> ModelSpec:
    """The spec of a loaded config: its `weights:` and `defaults:` blocks and the sizes the model has."""
    weights = _block(cfg, "weights")
    p = cfg.model.params
    seed = weights.get("random_seed")
    frames = int(p.unet_config.params.get("temporal_length", 16))
    defaults = model_defaults(cfg)
    longest = frames if defaults.interp else MAX_LENGTH_FACTOR * frames  # windowed beyond T
    defaults = defaults.with_values(frames=frames, frames_range=(frames, longest))
    return ModelSpec(
        name=str(cfg.get("name", "custom")),
        hub_repo=weights.get("hub_repo"),
        hub_file=str(weights.get("hub_file") or "model.ckpt"),
        local_checkpoint=weights.get("local_checkpoint"),
        random_seed=None if seed is None else int(seed),
        latent_size=tuple(int(s) for s in p.image_size),
        frames=frames,
        defaults=defaults,
        # The class name ending upstream's import path (dc_app.models.diffusion.FIRST_STAGE_CLASSES).
        temporal_decoder=str(p.first_stage_config.get("target") or "").endswith("AutoencoderKL_Dualref"),
    )


def spec_if_any(cfg: DictConfig) -> ModelSpec | None:
    """The spec of a dc_app yaml; None for a bare upstream config (no `weights:`/`defaults:` blocks), such as
    the reference configs the parity tests build models from."""
    if cfg.get("weights") is None or cfg.get("defaults") is None:
        return None
    return model_spec(cfg)


def model_interpolates(model) -> bool:
    """Whether a built model is an interpolation model, as its spec says (False for a bare upstream config)."""
    spec = spec_if_any(model.config)
    return bool(spec is not None and spec.interp)
