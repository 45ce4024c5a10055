"""Fault injection through DC_APP_FAULT (read at start-up only): each fault fails its request cleanly, leaves no
file behind, and the app keeps serving.

The app runs with DC_APP_FAULT="free-memory@1,raise@step2,oom@step3,writer@frame2"; each fault fires once, the
first time a run reaches it, so the requests below are chosen to meet them one at a time: the first run's memory
check sees 1 MiB free and is refused, 2 steps then meet raise@step2 only, 3 steps oom@step3, and the next run
(1 step) meets the writer fault at its second frame.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
from gradio_client import Client, handle_file

from apphelpers import REPO, start_app, stop_app

pytestmark = pytest.mark.slow

IMAGE = str(REPO / "assets" / "rocket.jpg")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    # Model and port come from DC_APP_MODEL and GRADIO_SERVER_PORT here, so the environment forms are covered too.
    running = start_app(tmp_path_factory.mktemp("faults"), {"DC_APP_FAULT": "free-memory@1,raise@step2,oom@step3,writer@frame2"},
                        via_env=True)
    yield running
    stop_app(running)


@pytest.fixture(scope="module")
def client(app):
    return Client(app.url, verbose=False)


def expect_failure(client, app, fragment: str, **args):
    with pytest.raises(Exception) as err:
        client.predict(handle_file(IMAGE), api_name="/generate", **args)
    assert fragment in str(err.value), str(err.value)
    assert app.alive()
    assert app.result_files() == []  # nothing: no video, no JSON, no temp file
    return str(err.value)


def test_fault_is_not_an_api_parameter(client):
    api = client.view_api(return_format="dict", print_info=False)
    names = {p["parameter_name"] for e in api["named_endpoints"].values() for p in e["parameters"]}
    assert not any("fault" in n for n in names)
    with pytest.raises(Exception):
        client.predict(handle_file(IMAGE), steps=1, fault="oom@step1", api_name="/generate")


def test_a_run_that_cannot_fit_is_refused_in_plain_words(client, app):
    # The tiny model needs about 47 MiB (its 41 MiB of weights included); 1 MiB free + the weights is less.
    message = expect_failure(client, app, "not enough RAM: this run needs at least", steps=2, seed=1)
    assert "Even with every low-memory option it needs about" in message or "To fit:" in message
    assert "Traceback" not in message and "/tmp" not in message


def test_exception_inside_the_sampler(client, app):
    message = expect_failure(client, app, "internal error while sampling with the fixed sampler (InjectedFault)",
                             steps=2, seed=1)
    assert "Traceback" not in message and "/" not in message.split("InjectedFault")[0]


def test_out_of_memory_inside_the_sampler(client, app):
    message = expect_failure(client, app, "out of memory on cpu at step 3 of the tiny model", steps=3, seed=1)
    assert "fewer steps" in message and "smaller model" in message


def test_exception_in_the_video_writer(client, app):
    expect_failure(client, app, "internal error while writing the video", steps=1, seed=1)


def test_the_app_keeps_serving(client, app):
    video, report, seed = client.predict(handle_file(IMAGE), steps=3, seed=4, api_name="/generate")
    assert report.startswith("fixed: finite") and seed == 4
    assert len(app.result_files()) == 2
    assert "Traceback" in app.log()  # the full story is in the server's log, not in the answer


def test_started_from_the_environment(app):
    assert "loading the tiny model" in app.log() and app.alive()


@pytest.mark.parametrize("args, env, message", [
    (["--model", "2048"], {}, "--model/DC_APP_MODEL: expected one of 256, 512, 1024, 512_interp, tiny, "
                              "tiny_interp, tooncrafter_512, tooncrafter_tiny, got '2048'"),
    ([], {"DC_APP_MODEL": "huge"}, "--model/DC_APP_MODEL: expected one of"),
    (["--model", "tiny", "--dtype", "fp8"], {}, "--dtype/DC_APP_DTYPE: expected one of fp32, fp16, bf16"),
])
def test_bad_options_stop_the_start(tmp_path, args, env, message):
    proc = subprocess.run([sys.executable, "app.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "DC_APP_OUTPUT_DIR": str(tmp_path), **env})
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_a_malformed_fault_stops_the_start(tmp_path):
    proc = subprocess.run([sys.executable, "app.py", "--model", "tiny", "--port", "9"], cwd=REPO,
                          env={"DC_APP_FAULT": "oom@frame2", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                               "GRADIO_ANALYTICS_ENABLED": "False", "DC_APP_OUTPUT_DIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "DC_APP_FAULT='oom@frame2'" in proc.stderr
