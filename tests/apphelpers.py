"""Start `python app.py --model tiny` (or tiny_interp) on a free loopback port for a test module, and talk to it.

One process per test module (start-up takes ~15 s on 2 cores): the tests then use it the way a user's
script does, through gradio_client or plain HTTP.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningApp:
    url: str
    port: int
    out_dir: Path
    log_path: Path
    proc: subprocess.Popen

    @property
    def results_dir(self) -> Path:
        return self.out_dir / "results"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None and httpx.get(self.url + "gradio_api/info", timeout=10).status_code == 200

    def result_files(self) -> list[str]:
        return sorted(p.name for p in self.results_dir.iterdir()) if self.results_dir.exists() else []

    def queue_size(self) -> int:
        return int(httpx.get(self.url + "gradio_api/queue/status", timeout=10).json()["queue_size"])


READY_LINE = "model is ready"  # app.py's log line once the model has loaded (the page is up before that)


def start_app(work_dir: Path, extra_env: dict[str, str] | None = None, via_env: bool = False,
              wait_for_model: bool = True, model: str = "tiny") -> RunningApp:
    """`via_env`: give the model and port as DC_APP_MODEL / GRADIO_SERVER_PORT instead of options.
    `wait_for_model`: return once the model has loaded, not as soon as the page is up.
    `model`: a test model with seeded random weights (tiny, or tiny_interp for the interpolation endpoints)."""
    port = free_port()
    out_dir = work_dir / "out"
    log_path = work_dir / "app.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADIO_", "DC_APP_"))}
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", DC_APP_OUTPUT_DIR=str(out_dir),
               NO_PROXY="127.0.0.1,localhost", PYTHONUNBUFFERED="1")
    env.update(extra_env or {})
    command = [sys.executable, "app.py"]
    if via_env:
        env.update(DC_APP_MODEL=model, GRADIO_SERVER_PORT=str(port))
    else:
        command += ["--model", model, "--port", str(port)]
    log = open(log_path, "w")
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    app = RunningApp(f"http://127.0.0.1:{port}/", port, out_dir, log_path, proc)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited with {proc.returncode} before serving:\n{app.log()[-3000:]}")
        try:
            if httpx.get(app.url + "gradio_api/info", timeout=2).status_code == 200 and (
                    not wait_for_model or READY_LINE in app.log()):
                return app
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_app(app)
    raise RuntimeError(f"app did not serve within {START_TIMEOUT_S} s:\n{app.log()[-3000:]}")


def stop_app(app: RunningApp) -> None:
    app.proc.terminate()
    try:
        app.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        app.proc.kill()
        app.proc.wait(timeout=15)


def upload(app: RunningApp, path: Path) -> dict:
    """Upload a file the way gradio_client does; -> the FileData payload the API expects."""
    with open(path, "rb") as f:
        r = httpx.post(app.url + "gradio_api/upload", files={"files": (path.name, f)}, timeout=60)
    r.raise_for_status()
    return {"path": r.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def call_raw(app: RunningApp, endpoint: str, args: dict, timeout: float = 300) -> tuple[str, object]:
    """POST /gradio_api/call/<endpoint> with a body gradio_client cannot send (NaN, Infinity: Python's JSON
    parser on the server accepts them); unnamed arguments get the endpoint's defaults, as gradio_client does.
    -> ("complete", outputs) or ("error", message or None)."""
    info = httpx.get(app.url + "gradio_api/info", timeout=10).json()["named_endpoints"][f"/{endpoint}"]
    data = [args.get(p["parameter_name"], p["parameter_default"]) for p in info["parameters"]]
    body = json.dumps({"data": data}, allow_nan=True)
    r = httpx.post(app.url + f"gradio_api/call/{endpoint}", content=body,
                   headers={"content-type": "application/json"}, timeout=60)
    if r.status_code != 200:
        return "error", r.text
    event_id = r.json()["event_id"]
    kind, payload = None, None
    with httpx.stream("GET", app.url + f"gradio_api/call/{endpoint}/{event_id}", timeout=timeout) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: ") and kind in ("complete", "error"):
                payload = json.loads(line[len("data: "):])
                break
    return kind, payload


def call_ui_event(app: RunningApp, elem_id: str | None, event: str, data: list, timeout: float = 300) -> dict:
    """Trigger one of the page's private events (e.g. the Generate button's click; `elem_id` None: the first
    event of that kind, whatever fires it) the way the browser does:
    POST /gradio_api/queue/join, then read the session's event stream. A hostile caller can do the same, so
    the handlers must check what arrives here as strictly as on the named API.
    -> the `process_completed` message: {"success": bool, "output": {"data": [...]} or {"error": ...}}."""
    config = httpx.get(app.url + "config", timeout=10).json()
    # elem_id None: the first event of that kind whatever fires it (the timer's tick has no elem_id).
    dependency, component = next((d["id"], t[0]) for d in config["dependencies"] for t in d["targets"]
                                 if t[1] == event and (elem_id is None or any(
                                     c["id"] == t[0] and c.get("props", {}).get("elem_id") == elem_id
                                     for c in config["components"])))
    session = uuid.uuid4().hex[:12]
    body = json.dumps({"data": data, "fn_index": dependency, "trigger_id": component, "session_hash": session,
                       "event_data": None}, allow_nan=True)
    r = httpx.post(app.url + "gradio_api/queue/join", content=body, headers={"content-type": "application/json"},
                   timeout=60)
    r.raise_for_status()
    with httpx.stream("GET", app.url + f"gradio_api/queue/data?session_hash={session}", timeout=timeout) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                message = json.loads(line[len("data: "):])
                if message.get("msg") == "process_completed":
                    return message
    raise AssertionError(f"the {elem_id} {event} event never completed")
