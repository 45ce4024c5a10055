"""The running app with an interpolation model (`python app.py --model tiny_interp`) through its API.

tiny_interp is the tiny architecture as an interpolation model with seeded random weights: what /interpolate
does (two images in, a video between them, or a loop) and how it guards its file inputs can be tested on a CPU.
"""
from __future__ import annotations

import imageio.v3 as iio
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from apphelpers import call_raw, start_app, stop_app, upload
from test_app_api import ALL_CASES, _make_images, _runs, assert_reveals_nothing, run_case

pytestmark = pytest.mark.slow

FRAMES, SIZE = 4, 64


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    running = start_app(tmp_path_factory.mktemp("interp"), model="tiny_interp")
    yield running
    stop_app(running)


@pytest.fixture(scope="module")
def client(app):
    return Client(app.url, verbose=False)


@pytest.fixture(scope="module")
def keyframes(tmp_path_factory):
    d = tmp_path_factory.mktemp("keyframes")
    red, blue = d / "red.png", d / "blue.png"
    Image.new("RGB", (96, 64), (220, 30, 30)).save(red)
    Image.new("RGB", (96, 64), (30, 30, 220)).save(blue)
    return red, blue


def test_interpolation_models_serve_interpolate(client):
    api = client.view_api(return_format="dict", print_info=False)
    assert set(api["named_endpoints"]) == {"/generate", "/compare", "/interpolate", "/storyboard"}
    params = [p["parameter_name"] for p in api["named_endpoints"]["/interpolate"]["parameters"]]
    assert params[:3] == ["image", "image2", "prompt"]
    defaults = {p["parameter_name"]: p["parameter_default"] for p in api["named_endpoints"]["/interpolate"]["parameters"]}
    assert defaults["fs"] == 5 and defaults["image2"] is None  # the yaml's defaults: 512_interp's


def test_interpolate_between_two_images(client, keyframes):
    red, blue = keyframes
    video, report, seed = client.predict(handle_file(red), handle_file(blue), prompt="red to blue", steps=1, seed=9,
                                         api_name="/interpolate")
    frames = iio.imread(video["path"] if isinstance(video, dict) else video)
    assert frames.shape == (FRAMES, SIZE, SIZE, 3)
    assert report.startswith("fixed: finite") and "model tiny_interp" in report and seed == 9


def test_interpolate_without_image2_makes_a_loop(client, keyframes):
    video, report, _ = client.predict(handle_file(keyframes[0]), None, steps=1, seed=9, api_name="/interpolate")
    assert iio.imread(video["path"] if isinstance(video, dict) else video).shape == (FRAMES, SIZE, SIZE, 3)


@pytest.mark.parametrize("field", ["image", "image2"])
def test_interpolate_refuses_server_files(app, keyframes, field):
    # Both image fields follow the upload rule: a path outside the uploads is refused, with or without meta.
    uploaded = upload(app, keyframes[0])
    for payload in ({"path": str(keyframes[1])}, {"path": str(keyframes[1]), "meta": {"_type": "x"}}):
        args = {"image": uploaded, "image2": uploaded, "steps": 1, field: payload}
        kind, message = call_raw(app, "interpolate", args)
        assert kind == "error" and "only files uploaded to this app can be used" in message["error"], message


@pytest.fixture(scope="module")
def three_keyframes(tmp_path_factory, keyframes):
    green = tmp_path_factory.mktemp("green") / "green.png"
    Image.new("RGB", (96, 64), (30, 200, 30)).save(green)
    return [keyframes[0], green, keyframes[1]]


@pytest.mark.parametrize("loop, frames", [(False, 7), (True, 9)])
def test_storyboard_of_three_keyframes(client, three_keyframes, loop, frames):
    # T = 4: 2T - 1 = 7 frames, or 3(T - 1) = 9 with loop; one prompt per segment.
    prompts = ["red to green", "green to blue"] + (["blue to red"] if loop else [])
    video, report, seed = client.predict([handle_file(k) for k in three_keyframes], prompts, loop, steps=1, seed=5,
                                         api_name="/storyboard")
    assert iio.imread(video["path"] if isinstance(video, dict) else video).shape == (frames, SIZE, SIZE, 3)
    assert report.startswith("fixed: finite") and seed == 5


def test_storyboard_refuses_server_files_and_bad_lists(app, three_keyframes):
    uploaded = [upload(app, k) for k in three_keyframes]
    planted = uploaded[:2] + [{"path": str(three_keyframes[2])}]  # a server path among real uploads
    kind, message = call_raw(app, "storyboard", {"keyframes": planted, "steps": 1})
    assert kind == "error" and "keyframes[2]: only files uploaded to this app can be used" in message["error"]
    kind, message = call_raw(app, "storyboard", {"keyframes": uploaded[:1], "steps": 1})
    assert kind == "error" and "keyframes: expected a list of 2 to 9 images, got 1 images" in message["error"]
    kind, message = call_raw(app, "storyboard", {"keyframes": uploaded, "prompts": ["a", "b", "c"], "steps": 1})
    assert kind == "error" and message["error"].startswith("prompts: expected one prompt, or one per segment")


# ------------------------------------------------------------------ the bad-input corpus's interpolation cases

INTERP_CASES = [c for c in ALL_CASES if c.get("model") == "tiny_interp"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _make_images(tmp_path_factory.mktemp("corpus-images"))


@pytest.mark.parametrize("case, transport", list(_runs(INTERP_CASES)))
def test_bad_input_corpus_on_an_interpolation_model(app, client, images, case, transport):
    # image2 and the storyboard's keyframes follow the upload rule and the image checks, like every file input.
    outcome, value = run_case(app, client, images, case, transport)
    assert outcome == "error", f"{case['id']}: accepted: {value}"
    assert case["message"] in value, f"{case['id']}: {value!r}"
    assert_reveals_nothing(app, images, value)
