"""Fault injection for tests: DC_APP_FAULT, read once when the app starts.

    oom@step3      torch.OutOfMemoryError inside the sampler, after the 3rd step
    raise@step2    an unexpected RuntimeError inside the sampler, after the 2nd step
    writer@frame2  an error in the video writer, before the 2nd frame is written
    load-delay@5   the model load takes 5 more seconds (the page and the API meanwhile say it is loading)
    load-error     the model load fails (every request then says so)
    free-memory@1  the next run's memory check sees 1 MiB free on the device (the run is refused before it starts)

Several may be given, comma-separated ("raise@step2,oom@step3"). Each fires once, the first time a run
reaches its point, like the transient failures it stands for; so a test can check that the very next request
works. It is never a request parameter: an API caller cannot switch it on, and a server started without the
variable cannot be made to fail.
"""
from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass

import torch

ENV_VAR = "DC_APP_FAULT"
_KINDS = {"oom": "step", "raise": "step", "writer": "frame"}
_PATTERN = re.compile(r"^(?P<kind>[a-z]+)@(?P<where>[a-z]+)(?P<n>[0-9]+)$")
_LOAD_DELAY = re.compile(r"^load-delay@(?P<s>[0-9]+(\.[0-9]+)?)$")
_FREE_MEMORY = re.compile(r"^free-memory@(?P<mib>[0-9]+)$")


class InjectedFault(RuntimeError):
    """The error `raise@stepN` and `writer@frameN` throw; never mistaken for a stock-sampler crash."""


@dataclass(frozen=True)
class Fault:
    kind: str   # oom | raise | writer
    at: int     # 1-based step or frame number

    def __str__(self) -> str:
        return f"{self.kind}@{_KINDS[self.kind]}{self.at}"

    def error(self) -> Exception:
        if self.kind == "oom":
            return torch.OutOfMemoryError(f"injected by {ENV_VAR}={self}")
        return InjectedFault(f"injected by {ENV_VAR}={self}")


class FaultPlan:
    """The faults still armed; `at_step` / `at_frame` raise the matching one and disarm it."""

    def __init__(self, faults: list[Fault], load_delay: float = 0.0, load_error: bool = False,
                 free_memory_mib: int | None = None):
        self._armed = list(faults)
        self._lock = threading.Lock()
        self.load_delay = load_delay  # seconds added to the model load (load-delay@N)
        self.load_error = load_error  # the model load fails (load-error)
        self._free_memory_mib = free_memory_mib  # free-memory@N, until a run's memory check takes it

    def take_free_memory(self) -> int | None:
        """free-memory@N: N MiB in bytes, for the first run's memory check only; then None (the device's own)."""
        with self._lock:
            mib, self._free_memory_mib = self._free_memory_mib, None
        return None if mib is None else mib * 2**20

    def _fire(self, where: str, n: int) -> None:
        with self._lock:
            for fault in self._armed:
                if _KINDS[fault.kind] == where and fault.at == n:
                    self._armed.remove(fault)
                    break
            else:
                return
        raise fault.error()

    def at_step(self, step: int) -> None:
        """Called with the 1-based number of the step just run."""
        self._fire("step", step)

    def at_frame(self, frame: int) -> None:
        """Called with the 1-based number of the frame about to be written."""
        self._fire("frame", frame)

    @property
    def armed(self) -> list[Fault]:
        with self._lock:
            return list(self._armed)


def parse_fault(text: str | None) -> FaultPlan | None:
    """'raise@step2,oom@step3' -> a plan of two faults; empty -> None. Anything else is a start-up error:
    a typo must not silently run a test without its fault."""
    if not text or not text.strip():
        return None
    faults, load_delay, load_error, free_memory_mib = [], 0.0, False, None
    for part in (p.strip() for p in text.split(",")):
        if part == "load-error":
            load_error = True
            continue
        free = _FREE_MEMORY.match(part)
        if free:
            free_memory_mib = int(free["mib"])
            continue
        delay = _LOAD_DELAY.match(part)
        if delay:
            load_delay = float(delay["s"])
            continue
        m = _PATTERN.match(part)
        if not m or _KINDS.get(m["kind"]) != m["where"] or int(m["n"]) < 1:
            raise ValueError(
                f"{ENV_VAR}={text!r}: expected oom@stepN, raise@stepN, writer@frameN (N >= 1), load-delay@SECONDS, "
                f"load-error or free-memory@MIB, comma-separated"
            )
        faults.append(Fault(m["kind"], int(m["n"])))
    return FaultPlan(faults, load_delay, load_error, free_memory_mib)


def fault_from_env() -> FaultPlan | None:
    return parse_fault(os.environ.get(ENV_VAR))
