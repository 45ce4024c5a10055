"""The model the app serves, loading in the background so the page is up (and says why it waits) meanwhile.

`ModelLoader` knows from the config alone what the page needs (defaults, frame size, frame count), so the UI
builds at once; `model` is the loaded model, or a `ModelNotReady` whose message says in plain words what is
happening ("downloading model.ckpt from Doubiiu/DynamiCrafter_512: 3.2 GB so far") or why loading failed.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .checkpoints import CheckpointError, download_progress, local_checkpoint_path
from .spec import load_model_config, model_spec
from ..faults import InjectedFault
from ..models.weight_storage import WeightStorageUnsupported
from ..validation import UserFacingError

log = logging.getLogger(__name__)


class ModelNotReady(UserFacingError):
    """A request arrived before the model was loaded, or after loading failed; the message says which."""


class ModelLoader:
    """Loads one model with `load()` (a no-argument function), in a thread (`start`) or at once (`load_now`).

    `delay` (seconds) and `fail` come from DC_APP_FAULT (load-delay@N, load-error): tests use them to see the
    page and the API while a load is slow, or after it failed.
    """

    def __init__(self, name: str, load: Callable[[], Any], delay: float = 0.0, fail: bool = False,
                 hf_cache: Path | str | None = None):
        self.config = load_model_config(name)
        self.spec = model_spec(self.config)
        self.name = self.spec.name
        self.image_size = self.spec.latent_size  # latent (h, w), as DynamiCrafter reads it
        self.temporal_length = self.spec.frames
        self._load, self._delay, self._fail, self._hf_cache = load, float(delay), fail, hf_cache
        self._model = None
        self._error: str | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ loading
    def start(self) -> "ModelLoader":
        """Load in a daemon thread; the caller goes on at once."""
        self._thread = threading.Thread(target=self._run, name="dc_app-model-loader", daemon=True)
        self._thread.start()
        return self

    def load_now(self) -> "ModelLoader":
        """Load in this thread (ZeroGPU needs the model at module level); a failure is raised, as before."""
        self._run()
        if self._error is not None:
            raise RuntimeError(self._error)
        return self

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            if self._delay:
                time.sleep(self._delay)
            if self._fail:
                raise InjectedFault("injected by DC_APP_FAULT=load-error")
            self._model = self._load()
        except Exception as err:
            log.exception("loading the %s model failed", self.name)
            self._error = f"the {self.name} model could not be loaded: {_explain(err)}"
            print(f"dc_app: {self._error}", file=sys.stderr, flush=True)
        else:
            print(f"dc_app: the {self.name} model is ready ({time.perf_counter() - started:.1f} s)",
                  file=sys.stderr, flush=True)
        finally:
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once loading has ended (loaded or failed) within `timeout` seconds."""
        return self._done.wait(timeout)

    # ------------------------------------------------------------------------------------------- state
    @property
    def ready(self) -> bool:
        return self._done.is_set() and self._error is None

    @property
    def failed(self) -> bool:
        return self._done.is_set() and self._error is not None

    @property
    def state(self) -> str:
        """'loading', 'ready' or 'failed'."""
        return "ready" if self.ready else "failed" if self.failed else "loading"

    @property
    def status(self) -> str:
        """What is happening, in plain words: 'ready', the load error, or what the load is doing now."""
        if self._done.is_set():
            return "ready" if self._error is None else self._error
        repo, local = self.spec.hub_repo, local_checkpoint_path(self.spec)
        if repo and not (local is not None and local.is_file()):
            done = download_progress(repo, self._hf_cache)
            if done is not None:
                return f"downloading {self.spec.hub_file} from {repo}: {done / 1e9:.1f} GB so far"
        return f"loading the {self.name} model (reading the weights)"

    @property
    def model(self):
        """The loaded model; raises ModelNotReady (saying why) while loading or after a failed load."""
        if self.ready:
            return self._model
        if self.failed:
            raise ModelNotReady(f"{self._error}. The app cannot generate until it is restarted.")
        raise ModelNotReady(f"The model is still loading: {self.status}. Please try again in a moment.")


def _explain(err: Exception) -> str:
    """The error in plain words: dc_app's own messages as they are (they say what to do), others by type."""
    if isinstance(err, (CheckpointError, WeightStorageUnsupported, InjectedFault, MemoryError)):
        return str(err) or type(err).__name__
    return f"{type(err).__name__}; the server log has the details"
