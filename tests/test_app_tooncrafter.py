"""ToonCrafter through the running app (`python app.py --model tooncrafter_tiny`): stock vs fixed on keyframes.

tooncrafter_tiny is ToonCrafter's architecture (the dual-reference decoder included) at tiny size with seeded
random weights; it inherits the 512 model's zero-SNR schedule, so upstream's NaN settings break stock here too.
"""
from __future__ import annotations

import imageio.v3 as iio
import pytest
from gradio_client import Client, handle_file

from apphelpers import REPO, start_app, stop_app

pytestmark = pytest.mark.slow

START, END = REPO / "assets" / "ball_up.png", REPO / "assets" / "ball_down.png"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    app = start_app(tmp_path_factory.mktemp("toon"), model="tooncrafter_tiny")
    yield Client(app.url, verbose=False)
    stop_app(app)


def frames(video):
    return iio.imread(video["path"] if isinstance(video, dict) else video).astype(float)


def test_compare_on_keyframes_stock_black_fixed_finite(client):
    # 7 steps of uniform_trailing at eta 1: upstream's square-root argument is -5.96e-8 at t=999.
    stock, fixed, report = client.predict(handle_file(START), handle_file(END), prompt="a ball bouncing", steps=7,
                                          eta=1.0, timestep_spacing="uniform_trailing", seed=2, api_name="/compare")
    lines = report.splitlines()
    assert lines[0].startswith("stock: NaN from step 1 of 7 (t=999): video is black"), report
    assert lines[1].startswith("fixed: finite"), report
    assert frames(stock).max() <= 2 and frames(stock).shape == (4, 64, 64, 3)
    assert frames(fixed).std() > 5


def test_interpolate_and_the_temporal_decoder_notice(client):
    video, report, _ = client.predict(handle_file(START), handle_file(END), steps=2, seed=2, api_name="/interpolate")
    assert frames(video).shape == (4, 64, 64, 3) and "VAE:" not in report
    # Asking for per-frame decode changes nothing for this decoder, and the report says so.
    _, report, _ = client.predict(handle_file(START), handle_file(END), steps=2, seed=2, perframe_ae=True,
                                  api_name="/interpolate")
    assert "VAE: this model's decoder is temporal and always decodes 4 frames at once" in report
