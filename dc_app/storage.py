"""Where results go: one folder, file names from random ids, bounded in age and total size.

File names never come from the request (upstream names its output after the prompt, which lets one user
guess another's file and lets a prompt with "../" escape the folder). Each result is an mp4 and its JSON.
"""
from __future__ import annotations

import os
import secrets
import tempfile
import threading
import time
from pathlib import Path

MIN_KEEP_S = 3600             # a result stays downloadable at least this long (promised in the README)
MAX_AGE_S = 2 * 3600          # after this it is deleted at the next sweep
MAX_BYTES = 2 * 1024**3       # ~2000 results of the 512 model; one generation at a time makes < 100 an hour
PARTIAL_AGE_S = 600           # a temp file this old belongs to no running write (a killed process)


def default_root() -> Path:
    """$DC_APP_OUTPUT_DIR, else <system temp>/dc_app."""
    return Path(os.environ.get("DC_APP_OUTPUT_DIR") or Path(tempfile.gettempdir()) / "dc_app")


class OutputStore:
    """Result files under `root/results`, swept by age then size; safe to share between threads."""

    def __init__(self, root: Path | str | None = None, max_bytes: int = MAX_BYTES, max_age_s: float = MAX_AGE_S):
        if max_age_s < MIN_KEEP_S:
            raise ValueError(f"max_age_s={max_age_s}: results must be kept at least {MIN_KEEP_S} s")
        self.root = Path(root) if root is not None else default_root()
        self.dir = self.root / "results"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.max_age_s = float(max_age_s)
        self._lock = threading.Lock()

    def new_paths(self, stem: str = "") -> tuple[Path, Path]:
        """(mp4, json) paths for a new result: 128 random bits, unguessable and collision-free."""
        rid = secrets.token_hex(16)
        base = self.dir / (f"{rid}-{stem}" if stem else rid)
        return base.with_suffix(".mp4"), base.with_suffix(".json")

    def files(self) -> list[Path]:
        return [p for p in self.dir.iterdir() if p.is_file()]

    def sweep(self, now: float | None = None) -> list[Path]:
        """Delete expired results, stale temp files, then the oldest results while over the size bound.

        The size bound is only reached if more than MAX_BYTES are produced within MIN_KEEP_S; then the
        oldest go first (the alternative, refusing new work, would turn one heavy user into an outage).
        """
        now = time.time() if now is None else now
        removed = []
        with self._lock:
            entries = []
            for p in self.files():
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                age = now - st.st_mtime
                stale = age > (PARTIAL_AGE_S if ".partial" in p.name else self.max_age_s)
                if stale:
                    p.unlink(missing_ok=True)
                    removed.append(p)
                elif ".partial" not in p.name:
                    entries.append((st.st_mtime, st.st_size, p))
            total = sum(size for _, size, _ in entries)
            for _, size, p in sorted(entries, key=lambda e: e[0]):
                if total <= self.max_bytes:
                    break
                p.unlink(missing_ok=True)
                removed.append(p)
                total -= size
        return removed
