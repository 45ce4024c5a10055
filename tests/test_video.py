"""dc_app.video: frames -> H.264 yuv420p mp4 and JSON sidecar, written atomically."""
from __future__ import annotations

import json
import math

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import pytest
import torch

from dc_app.video import frames_to_uint8, partial_name, versions, write_mp4, write_sidecar


def mp4_meta(path) -> dict:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    reader.close()
    return meta


def test_frames_to_uint8_maps_range_and_nonfinite_values():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0, -3.0, math.nan, math.inf, -math.inf]).reshape(1, 1, 1, 8)
    out = frames_to_uint8(x.expand(3, 1, 1, 8))
    assert out.shape == (1, 1, 8, 3) and out.dtype == np.uint8
    # NaN -> black, as upstream's clamp-then-uint8 shows it; infinities clamp like finite values.
    assert out[0, 0, :, 0].tolist() == [0, 128, 255, 255, 0, 0, 255, 0]


def test_frames_to_uint8_layout():
    frames = torch.full((3, 2, 4, 6), -1.0)
    frames[0, 1] = 1.0  # red channel of the second frame
    out = frames_to_uint8(frames)
    assert out.shape == (2, 4, 6, 3)
    assert out[1, :, :, 0].min() == 255 and out[0].max() == 0 and out[1, :, :, 1:].max() == 0


def test_frames_to_uint8_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"expected \(3, t, H, W\)"):
        frames_to_uint8(torch.zeros(4, 2, 8, 8))


def test_mp4_is_h264_yuv420p_with_every_frame(tmp_path):
    t, h, w = 16, 64, 96
    levels = torch.linspace(-0.8, 0.8, t)
    frames = levels.view(1, t, 1, 1).expand(3, t, h, w).clone()
    path = write_mp4(frames, tmp_path / "a.mp4", fps=8)
    meta = mp4_meta(path)
    assert meta["codec"].startswith("h264") and meta["pix_fmt"].startswith("yuv420p")
    assert meta["fps"] == 8 and tuple(meta["size"]) == (w, h)
    decoded = iio.imread(path)
    assert decoded.shape == (t, h, w, 3)
    expected = ((levels + 1) * 127.5).numpy()
    assert np.allclose(decoded.reshape(t, -1).mean(axis=1), expected, atol=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]


def test_fps_is_configurable(tmp_path):
    path = write_mp4(torch.zeros(3, 4, 16, 16), tmp_path / "b.mp4", fps=24)
    assert mp4_meta(path)["fps"] == 24


def test_nan_video_is_black(tmp_path):
    path = write_mp4(torch.full((3, 4, 32, 32), math.nan), tmp_path / "nan.mp4")
    assert iio.imread(path).max() <= 2


def test_writer_error_leaves_no_file(tmp_path):
    def fail_at_second(i):
        if i == 1:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_mp4(torch.zeros(3, 4, 16, 16), tmp_path / "c.mp4", on_frame=fail_at_second)
    assert list(tmp_path.iterdir()) == []


def test_existing_result_is_replaced_whole(tmp_path):
    path = tmp_path / "d.mp4"
    write_mp4(torch.zeros(3, 2, 16, 16), path)
    write_mp4(torch.ones(3, 5, 16, 16), path)
    assert iio.imread(path).shape[0] == 5 and not partial_name(path).exists()


def test_odd_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_mp4(torch.zeros(3, 2, 15, 16), tmp_path / "e.mp4")
    assert list(tmp_path.iterdir()) == []


def test_sidecar_holds_settings_and_versions(tmp_path):
    settings = {"prompt": "a cat", "seed": 7, "steps": 25, "eta": 1.0, "cfg_scale": 7.5, "fs": 24,
                "sampler": "fixed", "timestep_spacing": "uniform_trailing", "guidance_rescale": 0.7, "model": "512"}
    path = write_sidecar(tmp_path / "r.json", settings)
    record = json.loads(path.read_text())
    assert {k: record[k] for k in settings} == settings
    import gradio

    assert record["versions"]["torch"] == torch.__version__
    assert record["versions"]["gradio"] == gradio.__version__
    assert record["versions"]["dc_app"] == versions()["dc_app"] and record["versions"]["dc_app"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_sidecar_refuses_nan_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        write_sidecar(tmp_path / "bad.json", {"eta": math.nan})
    assert list(tmp_path.iterdir()) == []
