"""What a generation request produced, as data: the videos, each sampler's outcome, the seed, timings, memory.

The service returns a `GenerationResult`; the UI, the API and the CLI read its fields. The report shown to
people is rendered from it (`report()`), and nothing ever parses that text back.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .settings import GenerationSettings

FINITE, NAN, CRASHED = "finite", "nan", "crashed"


def _num(x: float) -> str:
    return f"{x:g}"


def run_note(seconds: float, peak_bytes: int | None) -> str:
    """'(12.3 s)', or '(12.3 s, peak VRAM 9.87 GiB)' when the run was measured on a GPU."""
    if peak_bytes is None:
        return f"({seconds:.1f} s)"
    return f"({seconds:.1f} s, peak VRAM {peak_bytes / 2**30:.2f} GiB)"


@dataclass(frozen=True)
class SamplerOutcome:
    """One sampler's run: finite, NaN from some step on, or crashed (stock only: upstream's own failures)."""

    sampler: str
    status: str                          # FINITE, NAN or CRASHED
    seconds: float
    spacing: str = ""                    # the step grid it ran (stock falls back to the model's on grids it lacks)
    video: Path | None = None            # None after a crash
    sidecar: Path | None = None
    peak_bytes: int | None = None        # CUDA runs only
    timesteps: tuple[int, ...] = ()      # the DDPM timesteps the sampler ran (empty after a crash)
    nan_step: int | None = None          # 1-based step of the first non-finite value (None: only the video)
    nan_timestep: int | None = None
    black_share: float = 0.0             # share of the video's values that are not finite (shown black)
    crash_reason: str | None = None
    notices: tuple[str, ...] = ()        # the sampler's remarks on the settings (e.g. an eta it ignores)

    @property
    def finite(self) -> bool:
        return self.status == FINITE

    def health(self) -> str:
        """'finite', 'crashed: <reason>', or where NaN appeared and how much of the video it blacked out."""
        if self.status == FINITE:
            return "finite"
        if self.status == CRASHED:
            return f"crashed: {self.crash_reason}"
        where = ""
        if self.nan_step is not None:
            where = f" from step {self.nan_step} of {len(self.timesteps)} (t={self.nan_timestep})"
        if self.black_share == 1.0:
            effect = "video is black"
        elif self.black_share > 0:
            effect = f"{100 * self.black_share:.0f}% of the video is black"
        else:
            effect = "the final video is finite all the same"
        return f"NaN{where}: {effect}"

    def line(self) -> str:
        """The outcome's report line, e.g. 'stock: NaN from step 1 of 7 (t=999): video is black (3.1 s)'."""
        return f"{self.sampler}: {self.health()} {run_note(self.seconds, self.peak_bytes)}"


@dataclass(frozen=True)
class GenerationResult:
    """A finished request. `outcomes` are in run order: (stock, fixed) for a compare, one entry otherwise."""

    settings: GenerationSettings
    seed: int
    model_name: str
    outcomes: tuple[SamplerOutcome, ...]
    schedule_notes: tuple[str, ...] = ()   # what the spacing did to the step count, what fixed repaired
    memory_notes: tuple[str, ...] = ()     # the memory estimate against the device, and a warning if at risk

    @property
    def main(self) -> SamplerOutcome:
        """The run the request is for: the only one, or the non-stock one of a compare."""
        return self.outcomes[-1]

    @property
    def video(self) -> Path | None:
        return self.main.video

    @property
    def sidecar(self) -> Path | None:
        return self.main.sidecar

    @property
    def stock(self) -> SamplerOutcome | None:
        """A compare's stock run (None outside a compare)."""
        return self.outcomes[0] if len(self.outcomes) > 1 else None

    def settings_line(self) -> str:
        s = self.settings
        return (f"settings: {s.steps} steps ({s.timestep_spacing}), eta {_num(s.eta)}, CFG {_num(s.cfg_scale)}, "
                f"fs {s.fs}, guidance rescale {_num(s.guidance_rescale)}, seed {self.seed}, model {self.model_name}")

    def report(self) -> str:
        """The plain-words report: one line per sampler, the schedule notes, the settings, the notices."""
        lines = [o.line() for o in self.outcomes]
        lines.extend(self.schedule_notes)
        lines.extend(self.memory_notes)
        lines.extend(notice for o in self.outcomes for notice in o.notices)
        lines.append(self.settings_line())
        lines.extend(self.settings.notices)
        return "\n".join(lines)
