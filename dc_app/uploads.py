"""Which server files a request may name as an input image: only uploads, and the app's own examples.

Gradio checks that a file payload was uploaded only when the payload carries its `meta` marker
({"_type": "gradio.FileData"}); a payload without it, or with another `_type`, reaches the handler with
whatever `path` the caller wrote. So the handlers check every path here themselves, whatever the payload says:

* the real path (symlinks and `..` resolved) must lie inside Gradio's upload folder, or inside `assets/`
  (the example rows send those paths);
* the results folder is excluded even though it lies inside the upload folder: results are not uploads;
* the check runs before the file is touched, so the refusal reads the same for a missing file, a huge file
  and a non-image: a caller learns nothing about the server's disk from it.

Gradio does not track which caller uploaded a file, so one caller can still name another's upload if it
learns its random path; this rule is what can be enforced.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .validation import InputError

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"

# One wording for every refused path (no path, no reason: see the module docstring).
NOT_AN_UPLOAD = ("only files uploaded to this app can be used; upload the file first "
                 "(gradio_client.handle_file does it) and send what the upload returned")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


@dataclass(frozen=True)
class UploadRule:
    """The folders an input file may come from (`allowed`) and those it may not, though inside one (`excluded`)."""

    allowed: tuple[Path, ...]
    excluded: tuple[Path, ...] = ()

    @classmethod
    def for_app(cls, upload_folder: str | os.PathLike, results_folder: str | os.PathLike) -> "UploadRule":
        return cls(allowed=(Path(os.path.realpath(upload_folder)), ASSETS_DIR.resolve()),
                   excluded=(Path(os.path.realpath(results_folder)),))

    def permits(self, path: str | os.PathLike) -> bool:
        # realpath, not resolve(strict=True): a missing file must be judged (and refused) like any other.
        real = Path(os.path.realpath(path))
        if any(_inside(real, folder) for folder in self.excluded):
            return False
        return any(_inside(real, folder) for folder in self.allowed)

    def uploaded_path(self, value: Any, field: str) -> str | None:
        """The server path of an uploaded file payload ({"path": ...}), checked; None when nothing was sent.

        Bare strings (server paths, URLs) are refused outright: an upload always comes as a payload.
        """
        if value is None:
            return None
        if not isinstance(value, dict):
            raise InputError(f"{field}: send the image file itself (gradio_client.handle_file), not a path or a URL")
        path = value.get("path")
        if not isinstance(path, str) or not path or "\x00" in path or not self.permits(path):
            raise InputError(f"{field}: {NOT_AN_UPLOAD}")
        return path
