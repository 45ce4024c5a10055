"""The running app (`python app.py --model tiny`) through its API, the way a user's script calls it.

Covers issue 4's API checks (/generate, /compare NaN and crash), issue 6's bad-input corpus
(tests/data/bad_inputs.json), concurrency and the queue bound, cancellation, and what the server exposes.
"""
from __future__ import annotations

import inspect
import io
import json
import re
import struct
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import imageio.v3 as iio
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.utils import Status
from PIL import Image

from dc_app.settings import fields_of

from apphelpers import REPO, call_raw, call_ui_event, start_app, stop_app, upload

pytestmark = pytest.mark.slow

ALL_CASES = json.loads((Path(__file__).parent / "data" / "bad_inputs.json").read_text())["cases"]
# The cases for the tiny app; those naming another model (tiny_interp: image2, /storyboard) run in that app's
# module, tests/test_app_interpolation.py.
CORPUS = [c for c in ALL_CASES if c.get("model", "tiny") == "tiny"]
FRAMES, SIZE = 4, 64  # the tiny model: 4 frames of 64x64


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    running = start_app(tmp_path_factory.mktemp("app"))
    yield running
    stop_app(running)


@pytest.fixture(scope="module")
def client(app):
    return Client(app.url, verbose=False)


def _png_claiming(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _make_images(d: Path) -> dict[str, Path]:
    """Every image the corpus names, made here so the repo carries no binary test files."""
    out = {}

    def save(name, img, **kw):
        out[name] = d / name
        img.save(out[name], **kw)

    photo = Image.open(REPO / "assets" / "rocket.jpg").convert("RGB")
    save("ok.jpg", photo)
    save("rgba.png", photo.convert("RGBA"))
    save("la.png", photo.convert("LA"))
    pal = photo.convert("P")
    save("palette.png", pal, transparency=0)
    save("gray.png", photo.convert("L"))
    save("gray16.png", Image.fromarray((np.asarray(photo.convert("L"), dtype=np.uint16) * 257)))
    save("cmyk.jpg", photo.convert("CMYK"))
    photo.save(d / "gif.gif", save_all=True, append_images=[photo.rotate(90)], duration=100)
    out["gif.gif"] = d / "gif.gif"
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif.jpg", photo, exif=exif.tobytes())
    save("one_pixel.png", Image.new("RGB", (1, 1), (90, 20, 200)))
    save("strip.png", photo.resize((4000, 1)))
    (d / "text.png").write_text("not an image")
    (d / "empty.png").write_bytes(b"")
    (d / "svg.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    (d / "eps.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with open(d / "big.png", "wb") as f:  # sparse: 51 MB on paper, nothing on disk
        f.truncate(51 * 1024 * 1024)
    out["big.png"] = d / "big.png"
    whole = (d / "ok.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (d / "bomb.png").write_bytes(_png_claiming(100_000, 100_000))
    (d / "too_many_pixels.png").write_bytes(_png_claiming(6400, 6400))
    (d / "huge_side.png").write_bytes(_png_claiming(8193, 1))
    for name in ("text.png", "empty.png", "svg.svg", "eps.eps", "truncated.jpg", "bomb.png", "too_many_pixels.png",
                 "huge_side.png"):
        out[name] = d / name
    return {Path(k).stem: v for k, v in out.items()}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _make_images(tmp_path_factory.mktemp("images"))


def decode(video) -> np.ndarray:
    path = video["path"] if isinstance(video, dict) else video
    return iio.imread(path)


def assert_model_video(video, frames: int = FRAMES):
    decoded = decode(video)
    assert decoded.shape == (frames, SIZE, SIZE, 3)
    return decoded


# ---------------------------------------------------------------------------------------------- the API


def test_named_endpoints_use_the_service_argument_names(client):
    from dc_app.service import Service

    api = client.view_api(return_format="dict", print_info=False)
    assert set(api["named_endpoints"]) == {"/generate", "/compare", "/extend"}  # /interpolate: interp models
    assert api["unnamed_endpoints"] == {}
    for name, endpoint in api["named_endpoints"].items():
        params = endpoint["parameters"]
        # The service takes the images positionally, then the settings of the table (dc_app.settings) by name.
        images = [p.name for p in inspect.signature(getattr(Service, name[1:])).parameters.values()
                  if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"]
        if name == "/compare":
            images.remove("image2")  # tiny is not an interpolation model: its compare takes one image
        assert [p["parameter_name"] for p in params] == images + [f.name for f in fields_of(name[1:])]
        assert [p["parameter_name"] for p in params if not p["parameter_has_default"]] == images[:1]
    defaults = {p["parameter_name"]: p["parameter_default"] for p in api["named_endpoints"]["/generate"]["parameters"]}
    assert defaults["steps"] == 50 and defaults["timestep_spacing"] == "uniform_trailing" and defaults["seed"] == -1


def test_generate_returns_an_mp4_of_the_model_size(client, images):
    video, report, seed = client.predict(handle_file(images["ok"]), prompt="a rocket", steps=2, seed=11,
                                         api_name="/generate")
    frames = assert_model_video(video)
    assert frames.std() > 1
    assert report.startswith("fixed: finite (") and "seed 11," in report and seed == 11


def test_compare_shows_stock_nan_at_step_1(client, images):
    stock, fixed, report = client.predict(handle_file(images["ok"]), prompt="a rocket", steps=7, eta=1.0,
                                          timestep_spacing="uniform_trailing", seed=3, api_name="/compare")
    lines = report.splitlines()
    assert lines[0].startswith("stock: NaN from step 1 of 7 (t=999): video is black"), report
    assert lines[1].startswith("fixed: finite"), report
    assert assert_model_video(stock).max() <= 2  # black, as upstream's users see NaN
    fixed_frames = assert_model_video(fixed).astype(float)
    assert fixed_frames.std() > 5 and np.abs(np.diff(fixed_frames, axis=0)).mean() > 0.5  # moves, not constant


def test_compare_reports_the_stock_crash_in_words(client, images):
    stock, fixed, report = client.predict(handle_file(images["ok"]), prompt="a rocket", steps=36,
                                          timestep_spacing="uniform", seed=3, api_name="/compare")
    assert stock is None
    assert report.startswith("stock: crashed: uniform spacing cannot do 36 steps"), report
    assert report.splitlines()[1].startswith("fixed: finite")
    assert assert_model_video(fixed).std() > 5


@pytest.mark.parametrize("sampler", ["fixed", "stock", "dpmpp_2m", "dpmpp_2m_sde", "unipc"])
def test_every_sampler_through_the_api(client, images, sampler):
    spacing = "uniform_trailing" if sampler == "stock" else "logsnr"  # stock runs upstream's spacings only
    video, report, seed = client.predict(handle_file(images["ok"]), steps=3, seed=21, sampler=sampler,
                                         timestep_spacing=spacing, api_name="/generate")
    assert assert_model_video(video).std() > 1
    assert report.startswith(f"{sampler}: finite") and seed == 21


def test_compare_beside_a_multistep_sampler_on_logsnr(client, images):
    stock, chosen, report = client.predict(handle_file(images["ok"]), steps=7, eta=1.0, sampler="unipc",
                                           timestep_spacing="logsnr", seed=3, api_name="/compare")
    lines = report.splitlines()
    # stock cannot run logsnr: it runs the model's trailing spacing, with upstream's NaN at 7 steps, eta 1
    assert lines[0].startswith("stock: NaN from step 1 of 7 (t=999): video is black"), report
    assert lines[1].startswith("unipc: finite"), report
    assert "stock: runs upstream's spacings only; it ran uniform_trailing (the model's default), not logsnr" in lines
    assert assert_model_video(chosen).std() > 5


# ------------------------------------------------------------------------------------ bad-input corpus


def _special(value):
    return {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}.get(value, value) \
        if isinstance(value, str) else value


def _expand(args: dict) -> dict:
    out = {}
    for k, v in args.items():
        if isinstance(v, str) and v.startswith("REPEAT:"):
            _, ch, n = v.split(":")
            v = ch * int(n)
        elif isinstance(v, str) and v.lstrip("-").startswith("BIGINT:"):
            v = (-1 if v.startswith("-") else 1) * 10 ** (int(v.split(":")[1]) - 1)
        out[k] = v
    return out


def _server_file(app, images, case) -> dict:
    """The payload naming a file on the server's disk, outside the upload folder (see the corpus's "about")."""
    name = case["server_file"]
    if name == "missing":
        path = images["ok"].parent / "no-such-file.png"
    elif name == "in_results":
        app.results_dir.mkdir(parents=True, exist_ok=True)
        path = app.results_dir / "planted.jpg"
        path.write_bytes(images["ok"].read_bytes())
    else:
        path = images[name]
    text = str(path)
    if case.get("server_file_via") == "dotdot":
        text = str(app.out_dir) + "/" + "../" * 40 + text.lstrip("/")
    payload = {"path": text, **case.get("server_file_extra", {})}
    if "server_file_meta" in case:
        payload["meta"] = case["server_file_meta"]
    return payload


# The page's Generate event: the image, the settings of /generate in the table's order, then the compare switch.
UI_INPUTS = ["image"] + [f.name for f in fields_of("generate")] + ["compare"]


def _ui_defaults(app) -> dict:
    info = httpx.get(app.url + "gradio_api/info", timeout=10).json()["named_endpoints"]["/generate"]
    return {**{p["parameter_name"]: p["parameter_default"] for p in info["parameters"]}, "compare": False}


def run_case(app, client, images, case, transport=None) -> tuple[str, object]:
    """-> ("ok", (outputs)) or ("error", message)."""
    endpoint = case.get("endpoint", "generate")
    args = _expand(case["args"])
    transport = transport or case.get("transport")
    if "server_file" in case:
        image = _server_file(app, images, case)
    elif "image_payload" in case:
        image = case["image_payload"]
    elif case.get("image"):
        raw = transport == "http" or endpoint == "ui"
        image = upload(app, images[case["image"]]) if raw else handle_file(images[case["image"]])
    else:
        image = None
    field = case.get("field", "image")  # /extend's file input is its video
    raw = transport == "http"
    # More file inputs (image2, keyframes): an image name is uploaded, "@name" is that file's server path.
    files = {name: [_payload(app, images, v, raw) for v in value] if isinstance(value, list) else
             _payload(app, images, value, raw) for name, value in case.get("files", {}).items()}
    if endpoint == "ui":
        values = {**_ui_defaults(app), "image": image, **{k: _special(v) for k, v in args.items()}}
        message = call_ui_event(app, "generate", "click", [values[k] for k in UI_INPUTS])
        if message["success"]:
            return "ok", message["output"]["data"]
        return "error", message["output"].get("error") or ""
    if transport == "http":
        kind, payload = call_raw(app, endpoint, {field: image, **files, **{k: _special(v) for k, v in args.items()}})
        if kind == "complete":
            return "ok", payload
        return "error", (payload or {}).get("error") or ""
    try:
        if files:  # by name: /storyboard has no image parameter
            return "ok", client.predict(api_name=f"/{endpoint}", **({field: image} if image else {}), **files, **args)
        return "ok", client.predict(image, api_name=f"/{endpoint}", **args)
    except Exception as err:  # gradio_client raises AppError with the server's message
        return "error", str(err)


def _payload(app, images, name: str, raw: bool):
    if name.startswith("@"):
        return _server_file(app, images, {"server_file": name[1:]})
    return upload(app, images[name]) if raw else handle_file(images[name])


def _runs(corpus):
    """(case, transport) pairs: a case marked "both" runs as raw HTTP and through gradio_client."""
    for case in corpus:
        if case.get("transport") == "both":
            yield pytest.param(case, "http", id=f"{case['id']}-http")
            yield pytest.param(case, "client", id=f"{case['id']}-client")
        else:
            yield pytest.param(case, case.get("transport"), id=case["id"])


def test_corpus_is_big_enough_and_well_formed(images):
    assert len(CORPUS) >= 40 and len({c["id"] for c in CORPUS}) == len(CORPUS)
    for case in CORPUS:
        assert case["expect"] in ("accept", "notice", "reject") and case["message"]
        assert case.get("image") is None or case["image"] in images, case["id"]


# "FileNotFoundError", "OverflowError", "InvalidPathError", "TypeError", "KeyError", "Exception"...
EXCEPTION_NAME = re.compile(r"\b[A-Z]\w*(Error|Exception)\b")


def assert_reveals_nothing(app, images, text: str) -> None:
    """No server path (the working directory, the app's temp folder, where the test made its files) and no
    Python exception class name in what a caller was told."""
    for folder in (REPO, app.out_dir, images["ok"].parent, Path(tempfile.gettempdir())):
        assert str(folder) not in text, text
    assert not EXCEPTION_NAME.search(text), text


@pytest.mark.parametrize("case, transport", list(_runs(CORPUS)))
def test_bad_input_corpus(app, client, images, case, transport):
    outcome, value = run_case(app, client, images, case, transport)
    if case["expect"] == "reject":
        assert outcome == "error", f"{case['id']}: accepted: {value}"
        assert case["message"] in value, f"{case['id']}: {value!r}"
        assert_reveals_nothing(app, images, value)
        return
    assert outcome == "ok", f"{case['id']}: rejected: {value}"
    video, report, _seed = value
    assert_reveals_nothing(app, images, report)
    assert_model_video(video, case["args"].get("frames", FRAMES))
    assert case["message"] in report, report
    notices = [line for line in report.splitlines() if line.startswith("prompt:")]
    assert bool(notices) == (case["expect"] == "notice"), report


def test_a_valid_request_after_the_corpus_succeeds(app, client, images):
    video, report, seed = client.predict(handle_file(images["ok"]), steps=1, seed=5, api_name="/generate")
    assert_model_video(video)
    assert seed == 5 and app.alive()
    assert not [f for f in app.result_files() if ".partial" in f]


@pytest.mark.parametrize("transport", ["http", "client"])
def test_a_probe_cannot_tell_a_missing_file_from_a_big_one_or_a_non_image(app, client, images, transport):
    answers = set()
    for name in ("missing", "big", "text", "ok"):
        outcome, message = run_case(app, client, images, {"server_file": name, "args": {}}, transport)
        assert outcome == "error"
        answers.add(message)
    assert len(answers) == 1, answers


def test_example_images_and_uploads_are_still_accepted(app, images):
    # The upload rule lets through what the page needs: an upload, and assets/ (the example rows send those).
    for payload in (upload(app, images["ok"]), {"path": str(REPO / "assets" / "rocket.jpg")}):
        kind, outputs = call_raw(app, "generate", {"image": payload, "steps": 1, "seed": 4})
        assert kind == "complete", outputs
        [[video, report, seed]] = outputs  # gr.api sends the returned tuple as one output
        assert_model_video(video["path"])
        assert seed == 4 and report.startswith("fixed: finite")


@pytest.mark.parametrize("data", [[], ["x"], [1, "x", None, 4], [10**400, "NaN", {"a": 1}], "text"])
def test_the_private_tick_event_echoes_no_python_error(app, data):
    # The page's timer tick takes (steps, eta, spacing); a caller can send anything instead.
    message = call_ui_event(app, None, "tick", data if isinstance(data, list) else [data])
    text = json.dumps(message["output"])
    assert not EXCEPTION_NAME.search(text) and str(REPO) not in text and str(app.out_dir) not in text, text


# ------------------------------------------------------------------------------------------ exposure


def test_listens_on_loopback_only(app):
    # /proc/net/tcp lists listening sockets as hex "address:port"; 0100007F is 127.0.0.1.
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    listening = [r[1] for r in rows if r[3] == "0A" and int(r[1].split(":")[1], 16) == app.port]
    assert listening == [f"0100007F:{app.port:04X}"]
    assert "gradio.live" not in app.log()  # no share link


def test_serves_assets_but_nothing_else_of_the_disk(app):
    def get(path):
        return httpx.get(app.url + f"gradio_api/file={path}", timeout=10).status_code

    assert get(REPO / "assets" / "rocket.jpg") == 200
    assert get(REPO / "app.py") == 403
    assert get("/etc/passwd") == 403
    assert get(REPO / "tests" / "data" / "tiny" / "config.yaml") == 403


def test_uploads_over_the_size_limit_are_refused(app, tmp_path):
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(51 * 1024 * 1024)
    with open(big, "rb") as f:
        r = httpx.post(app.url + "gradio_api/upload", files={"files": ("big.png", f)}, timeout=120)
    assert r.status_code == 413


# --------------------------------------------------------------------------- concurrency and the queue


def test_eight_clients_at_once_each_get_their_own_result(app, images):
    seeds = list(range(500, 508))

    def one(seed):
        return Client(app.url, verbose=False).predict(handle_file(images["ok"]), steps=1, seed=seed,
                                                      api_name="/generate")

    with ThreadPoolExecutor(len(seeds)) as pool:
        results = list(pool.map(one, seeds))
    videos = {}
    for seed, (video, report, used) in zip(seeds, results):
        assert used == seed and f"seed {seed}," in report
        videos[seed] = assert_model_video(video).astype(int)
    paths = [r[0] for r in results]
    assert len(set(paths)) == len(paths)
    for a in seeds:
        for b in seeds:
            if a < b:
                assert np.abs(videos[a] - videos[b]).mean() > 1  # different seeds, different videos
    # The same seed alone gives the same video: no result crossed to another client.
    for seed in seeds[:2]:
        video, _, _ = Client(app.url, verbose=False).predict(handle_file(images["ok"]), steps=1, seed=seed,
                                                             api_name="/generate")
        assert np.abs(decode(video).astype(int) - videos[seed]).max() <= 2


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_full_queue_answers_busy_and_recovers(app, images):
    client = Client(app.url, verbose=False)
    image = handle_file(images["ok"])
    running = client.submit(image, steps=1000, seed=1, api_name="/generate")
    _wait_for(lambda: running.status().code == Status.PROCESSING, 120, "the long run to start")
    waiting = [client.submit(image, steps=1, seed=i, api_name="/generate") for i in range(16)]
    _wait_for(lambda: app.queue_size() == 16, 120, "16 queued requests")
    extra = client.submit(image, steps=1, seed=99, api_name="/generate")
    with pytest.raises(Exception, match="Queue is full"):
        extra.result(timeout=120)
    for job in waiting:
        job.cancel()
    running.cancel()
    _wait_for(lambda: app.queue_size() == 0, 60, "the queue to empty")
    video, _, seed = Client(app.url, verbose=False).predict(image, steps=1, seed=7, api_name="/generate")
    assert seed == 7 and assert_model_video(video) is not None


def test_cancel_stops_a_run_within_a_step_and_leaves_nothing(app, images):
    client = Client(app.url, verbose=False)
    image = handle_file(images["ok"])
    before = app.result_files()
    log_before = app.log()
    job = client.submit(image, steps=1000, seed=2, api_name="/generate")
    _wait_for(lambda: job.status().code == Status.PROCESSING, 120, "the run to start")
    time.sleep(2)
    job.cancel()
    _wait_for(lambda: "cancelled at step" in app.log()[len(log_before):], 60, "the run to stop")
    stopped_at = int(re.search(r"cancelled at step (\d+)", app.log()[len(log_before):]).group(1))
    assert 1 <= stopped_at < 1000
    video, _, seed = client.predict(image, steps=1, seed=8, api_name="/generate")
    assert seed == 8
    new = sorted(set(app.result_files()) - set(before))
    # only the last request's mp4 and JSON: the cancelled run left nothing, not even a temp file
    assert [Path(n).suffix for n in new] == [".json", ".mp4"] and Path(new[0]).stem == Path(new[1]).stem


def test_extend_through_the_api(app, client, images):
    video, _, _ = client.predict(handle_file(images["ok"]), steps=1, seed=12, api_name="/generate")
    path = video["path"] if isinstance(video, dict) else video
    joined, report, seed = client.predict(handle_file(path), steps=1, seed=13, frames=5, api_name="/extend")
    assert assert_model_video(joined, FRAMES + 5 - 1).std() > 1 and seed == 13
    # The video field follows the upload rule like the image fields.
    kind, message = call_raw(app, "extend", {"video": {"path": path}, "steps": 1})
    assert kind == "error" and "video: only files uploaded to this app can be used" in message["error"]
