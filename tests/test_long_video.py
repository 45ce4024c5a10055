"""Long videos: window layout and fusion, FreeNoise rescheduling, the windowed model, storyboards, extend."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dc_app import build_model, load_model_config, load_pretrained
from dc_app.extend import extend_video, last_frame
from dc_app.noise_rescheduling import initial_noise, reschedule_noise
from dc_app.pipeline import run_synthesis
from dc_app.sampling import DDIMSampler, FixedDDIMSampler
from dc_app.storyboard import (MAX_KEYFRAMES, join_segments, run_storyboard, segment_prompts,
                               storyboard_frame_count)
from dc_app.validation import InputError
from dc_app.video import write_mp4
from dc_app.windowed_model import WindowedModel
from dc_app.windows import WindowLayout, default_stride, window_starts

T = 4  # the tiny model's trained length


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return load_pretrained("tiny", device="cpu")


@pytest.fixture(scope="module")
def tiny_interp(tiny):
    """The tiny architecture and weights as an interpolation model (as 512_interp is the 512 architecture)."""
    cfg = load_model_config("tiny")
    cfg.defaults.interp = True
    model = build_model(cfg)
    model.load_state_dict(tiny.state_dict())
    return model.eval()


def image_video(seed: int = 0, frames: int = T) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, 3, 1, 64, 64, generator=g) * 2 - 1).repeat(1, 1, frames, 1, 1)


RUN = dict(ddim_steps=3, unconditional_guidance_scale=7.5, guidance_rescale=0.7, fs=24,
           timestep_spacing="uniform_trailing")


def run(model, sampler="fixed", frames=T, seed=0, **kw):
    args = dict(RUN, **kw)
    return run_synthesis(model, sampler, ["a boat on a lake"], image_video(), [1, 4, frames, 8, 8],
                         generator=torch.Generator().manual_seed(seed), **args)


# --------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("window", [4, 16])
def test_fusion_weights_sum_to_one_for_every_frame(window):
    for frames in range(window, 8 * window + 1):
        for stride in range(1, window + 1):
            layout = WindowLayout.for_model(frames, window, stride)
            starts = layout.starts
            assert starts[0] == 0 and starts[-1] == frames - window, "the last window ends flush with the video"
            assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))
            assert (layout.weights > 0).all()
            torch.testing.assert_close(layout.frame_weight_sums(), torch.ones(frames, dtype=torch.float64),
                                       atol=1e-12, rtol=0)


@pytest.mark.parametrize("window", [4, 16])
def test_window_count_at_the_default_stride_is_4n_over_t_minus_3(window):
    stride = default_stride(window)
    assert stride == window // 4
    for multiple in range(window, 8 * window + 1, stride):
        assert WindowLayout.for_model(multiple, window).count == 4 * multiple // window - 3


def test_weights_taper_towards_window_edges():
    layout = WindowLayout.for_model(8 * 16, 16)
    inner = layout.weights[len(layout.starts) // 2]  # a window covered on both sides by others
    assert inner[0] < inner[4] < inner[8] and inner[15] < inner[11] < inner[8]
    # A frame covered by one window only (the video's first and last) takes that window's output as it is.
    assert layout.weights[0, 0] == 1.0 and layout.weights[-1, -1] == 1.0


def test_window_layout_rejects_bad_values():
    with pytest.raises(ValueError, match="frames"):
        window_starts(3, 4, 1)
    with pytest.raises(ValueError, match="stride"):
        window_starts(8, 4, 5)
    with pytest.raises(ValueError, match="stride"):
        window_starts(8, 4, 0)


# ------------------------------------------------------------------------------------- noise rescheduling
@pytest.mark.parametrize("frames,stride", [(16, 4), (23, 4), (37, 3), (64, 16), (30, 1)])
def test_rescheduled_noise_is_shuffled_first_window_noise_reproducible_from_the_seed(frames, stride):
    window = 16
    shape = (2, 4, frames, 3, 5)
    a = initial_noise(shape, window, stride, generator=torch.Generator().manual_seed(7))
    b = initial_noise(shape, window, stride, generator=torch.Generator().manual_seed(7))
    c = initial_noise(shape, window, stride, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # The first window is the plain draw; every later block of `stride` frames is a permutation of (a prefix
    # of) the frames one window earlier, hence a shuffle of the first window's noises.
    first = torch.randn((2, 4, window, 3, 5), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[:, :, :window], first)
    for start in range(window, frames, stride):
        count = min(stride, frames - start)
        block = a[:, :, start : start + count]
        sources = [a[:, :, s] for s in range(start - window, start - window + stride)]
        matches = [[j for j, src in enumerate(sources) if torch.equal(block[:, :, i], src)] for i in range(count)]
        assert all(len(m) == 1 for m in matches)
        assert len({m[0] for m in matches}) == count, "a block uses each source frame once"


def test_rescheduling_off_or_one_window_is_the_plain_draw():
    shape = (1, 4, 20, 3, 5)
    off = initial_noise(shape, 16, 4, reschedule=False, generator=torch.Generator().manual_seed(3))
    assert torch.equal(off, torch.randn(shape, generator=torch.Generator().manual_seed(3)))
    one = initial_noise((1, 4, 16, 3, 5), 16, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(one, torch.randn((1, 4, 16, 3, 5), generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="frames"):
        reschedule_noise(torch.zeros(1, 4, 16, 3, 5), 15, 4)


# -------------------------------------------------------------------------------------- windowed model
class FrameLocalDenoiser:
    """A stand-in for the UNet whose output at a frame depends only on that frame (and per-sample inputs),
    with the tiny model's schedule, so the real samplers can run it. Fusion of its windows must give its
    full-length output exactly (up to float rounding of the weights)."""

    def __init__(self, schedule_model, window: int):
        self.schedule_model, self.temporal_length = schedule_model, window
        self.frames_seen: list[int] = []

    def __getattr__(self, name):
        return getattr(self.schedule_model, name)

    def apply_model(self, x, t, cond, fs=None, **kw):
        self.frames_seen.append(x.shape[2])
        b = x.shape[0]
        per_sample = (t.float() / 1000 + fs.float() / 100).view(b, 1, 1, 1, 1)
        context = cond["c_crossattn"][0].mean(dim=(1, 2)).view(b, 1, 1, 1, 1)
        return torch.tanh(x * 0.7 + cond["c_concat"][0] * 0.3 + per_sample) + context


def frame_local_inputs(batch, frames, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, 8, 8, generator=g)
    cond = {"c_concat": [torch.randn(batch, 4, frames, 8, 8, generator=g)],
            "c_crossattn": [torch.randn(batch, 77 + 16 * T, 64, generator=g)]}
    t = torch.tensor([999, 500][:batch])
    fs = torch.tensor([24, 10][:batch])
    return x, t, cond, fs


@pytest.mark.parametrize("frames,stride,window_batch", [(5, 1, 1), (11, 1, 3), (13, 3, 2), (32, 2, 4), (9, 4, 1)])
def test_windowed_frame_local_denoiser_equals_full_length(tiny, frames, stride, window_batch):
    stand_in = FrameLocalDenoiser(tiny, T)
    x, t, cond, fs = frame_local_inputs(2, frames)
    full = stand_in.apply_model(x, t, cond, fs=fs)
    windowed_model = WindowedModel(stand_in, frames, stride, window_batch)
    windowed = windowed_model.apply_model(x, t, cond, fs=fs)
    torch.testing.assert_close(windowed, full, atol=2e-7, rtol=1e-6)
    assert set(stand_in.frames_seen[1:]) == {T}, "the denoiser only ever sees windows of T frames"
    assert windowed_model.unet_calls == windowed_model.calls_per_evaluation


@pytest.mark.parametrize("sampler_class", [FixedDDIMSampler, DDIMSampler])
@pytest.mark.parametrize("batched_cfg", [True, False])
def test_sampling_through_windows_equals_full_length_sampling(tiny, sampler_class, batched_cfg):
    frames = 10
    stand_in = FrameLocalDenoiser(tiny, T)
    x_T, _, cond, fs = frame_local_inputs(1, frames, seed=1)
    _, _, uncond, _ = frame_local_inputs(1, frames, seed=2)

    def sample(model):
        return sampler_class(model).sample(4, 1, x_T.shape[1:], conditioning=cond, eta=1.0, x_T=x_T,
                                           unconditional_guidance_scale=7.5, unconditional_conditioning=uncond,
                                           fs=fs[:1], timestep_spacing="uniform_trailing", verbose=False,
                                           generator=torch.Generator().manual_seed(0), batched_cfg=batched_cfg)[0]

    full = sample(stand_in)
    windowed = sample(WindowedModel(stand_in, frames, stride=2))
    torch.testing.assert_close(windowed, full, atol=1e-5, rtol=1e-5)


def test_window_batches_give_the_same_output_as_one_window_at_a_time(tiny):
    frames = 9
    x, t, cond, fs = frame_local_inputs(2, frames, seed=3)
    cond["c_crossattn"] = [torch.randn(2, 77 + 16 * T, 64, generator=torch.Generator().manual_seed(4))]
    one = WindowedModel(tiny, frames, 2, window_batch=1)
    three = WindowedModel(tiny, frames, 2, window_batch=3)
    out_one, out_three = one.apply_model(x, t, cond, fs=fs), three.apply_model(x, t, cond, fs=fs)
    torch.testing.assert_close(out_three, out_one, atol=1e-5, rtol=1e-5)
    assert (one.unet_calls, three.unet_calls) == (4, 2)


def test_one_window_calls_the_model_straight_through(tiny):
    x, t, cond, fs = frame_local_inputs(2, T, seed=5)
    cond["c_crossattn"] = [torch.randn(2, 77 + 16 * T, 64, generator=torch.Generator().manual_seed(6))]
    assert torch.equal(WindowedModel(tiny, T, window_batch=3).apply_model(x, t, cond, fs=fs),
                       tiny.apply_model(x, t, cond, fs=fs))


# ----------------------------------------------------------------------------------------- pipeline
@pytest.mark.parametrize("sampler", ["fixed", "stock"])
@pytest.mark.parametrize("batched_cfg", [True, False])
def test_n_equals_t_is_the_plain_path_bit_for_bit(tiny, sampler, batched_cfg):
    plain = run(tiny, sampler, batched_cfg=batched_cfg)
    calls = []
    long = run(tiny, sampler, frames=T, batched_cfg=batched_cfg, window_stride=2, window_batch=2,
               reschedule_noise=True, on_unet_call=lambda done, total: calls.append((done, total)))
    assert torch.equal(long.videos, plain.videos)
    assert long.long_video["windows"] == 1
    steps = len(plain.ddim_timesteps)
    assert calls[-1] == (steps * (1 if batched_cfg else 2),) * 2


@pytest.mark.parametrize("sampler", ["fixed", "stock"])
@pytest.mark.parametrize("frames", [5, 7, 10, 32])
def test_long_tiny_runs_are_finite(tiny, sampler, frames):
    stride = 3 if frames == 10 else None  # 10 - 4 is not a multiple of 3: the last window overlaps more
    calls = []
    result = run(tiny, sampler, frames=frames, window_stride=stride, ddim_steps=2,
                 on_unet_call=lambda done, total: calls.append((done, total)))
    assert result.videos.shape == (1, 1, 3, frames, 64, 64)
    assert torch.isfinite(result.videos).all() and result.nonfinite is None
    assert result.videos.std() > 0
    info = result.long_video
    layout = WindowLayout.for_model(frames, T, stride)
    assert (info["frames"], info["windows"], info["stride"]) == (frames, layout.count, layout.stride)
    assert calls[-1][0] == calls[-1][1] == info["unet_calls"] == len(result.ddim_timesteps) * layout.count


def test_long_run_is_reproducible_and_rescheduling_changes_it(tiny):
    a, b = run(tiny, frames=8, ddim_steps=2), run(tiny, frames=8, ddim_steps=2)
    off = run(tiny, frames=8, ddim_steps=2, reschedule_noise=False)
    assert torch.equal(a.videos, b.videos)
    assert not torch.equal(a.videos, off.videos)
    assert off.long_video["reschedule_noise"] is False


def test_cancel_from_the_unet_call_hook_stops_the_run(tiny):
    class Stop(Exception):
        pass

    def hook(done, total):
        if done == 3:
            raise Stop

    with pytest.raises(Stop):
        run(tiny, frames=12, on_unet_call=hook)


def test_bad_frame_counts_are_refused(tiny, tiny_interp):
    with pytest.raises(ValueError, match="expected 4 to 32"):
        run(tiny, frames=3)
    with pytest.raises(ValueError, match="expected 4 to 32"):
        run(tiny, frames=33)
    with pytest.raises(ValueError, match="interpolation model makes exactly"):
        run_synthesis(tiny_interp, "fixed", ["x"], image_video(), [1, 4, 8, 8, 8], interp=True, ddim_steps=2)
    with pytest.raises(ValueError, match="stride"):
        run(tiny, window_stride=0)
    with pytest.raises(ValueError, match="window_batch"):
        run(tiny, window_batch=0)
    with pytest.raises(ValueError, match="give one length"):
        run_synthesis(tiny, "fixed", ["x"], image_video(), [1, 4, 8, 8, 8], frames=6, ddim_steps=2)


def test_long_videos_decode_at_most_t_frames_at_a_time(tiny, monkeypatch):
    chunks = []
    decode = tiny.first_stage_model.decode
    monkeypatch.setattr(tiny.first_stage_model, "decode", lambda z: chunks.append(len(z)) or decode(z))
    monkeypatch.setattr(tiny, "perframe_ae", False)
    run(tiny, frames=10, ddim_steps=1)
    assert chunks == [T, T, 2]


# --------------------------------------------------------------------------------------- storyboard
def test_join_segments_keeps_one_copy_of_each_keyframe():
    # Segment k's frames are numbered 10 k + j, so the join shows which frames it kept.
    segments = [torch.tensor([10.0 * k + j for j in range(T)]).view(1, T, 1, 1) for k in range(3)]
    joined = join_segments(segments).flatten().tolist()
    assert joined == [0, 1, 2, 3, 11, 12, 13, 21, 22, 23]
    looped = join_segments(segments, closing=True).flatten().tolist()
    assert looped == [0, 1, 2, 3, 11, 12, 13, 21, 22]
    assert len(joined) == storyboard_frame_count(4, T, loop=False)  # 3 segments between 4 keyframes
    assert len(looped) == storyboard_frame_count(3, T, loop=True)   # 3 keyframes and the closing segment


@pytest.mark.parametrize("count", [3, 4])
@pytest.mark.parametrize("loop", [False, True])
def test_storyboard_frame_counts_and_joins(tiny_interp, count, loop):
    keyframes = [image_video(seed)[0, :, 0] for seed in range(count)]
    result = run_storyboard(tiny_interp, "fixed", keyframes, "a flower opening", loop=loop, ddim_steps=2,
                            generator=torch.Generator().manual_seed(0))
    expected = count * (T - 1) if loop else (count - 1) * (T - 1) + 1
    assert expected == {(3, False): 2 * T - 1, (4, False): 3 * T - 2, (3, True): 3 * (T - 1),
                        (4, True): 4 * (T - 1)}[(count, loop)]
    assert result.video.shape == (3, expected, 64, 64)
    assert torch.isfinite(result.video).all()
    segments = [s.videos[0, 0] for s in result.segments]
    assert len(segments) == (count if loop else count - 1)
    # Frame by frame: the first segment whole, then each later segment without its first frame (the shared
    # keyframe, already ending the segment before), the closing segment also without its last frame.
    position = 0
    for k, segment in enumerate(segments):
        keep = segment[:, (0 if k == 0 else 1):]
        if loop and k == len(segments) - 1:
            keep = keep[:, :-1]
        assert torch.equal(result.video[:, position : position + keep.shape[1]], keep)
        position += keep.shape[1]
    assert position == expected
    assert result.keyframe_order == list(range(count)) + ([0] if loop else [])


def test_storyboard_segments_interpolate_their_own_keyframe_pair(tiny_interp):
    keyframes = [image_video(seed)[0, :, 0] for seed in range(3)]
    board = run_storyboard(tiny_interp, "fixed", keyframes, ["one", "two"], ddim_steps=2,
                           generator=torch.Generator().manual_seed(5))
    # The same draws in the same order, pair by pair, by hand.
    g = torch.Generator().manual_seed(5)
    for k, text in enumerate(["one", "two"]):
        pair = torch.stack([keyframes[k], keyframes[k], keyframes[k + 1], keyframes[k + 1]], dim=1).unsqueeze(0)
        alone = run_synthesis(tiny_interp, "fixed", [text], pair, [1, 4, T, 8, 8], interp=True, ddim_steps=2,
                              generator=g)
        assert torch.equal(board.segments[k].videos, alone.videos)


def test_storyboard_bad_input(tiny, tiny_interp):
    frame = image_video()[0, :, 0]
    with pytest.raises(ValueError, match="cannot interpolate"):
        run_storyboard(tiny, "fixed", [frame, frame])
    with pytest.raises(ValueError, match="keyframes"):
        run_storyboard(tiny_interp, "fixed", [frame])
    with pytest.raises(ValueError, match="keyframes"):
        run_storyboard(tiny_interp, "fixed", [frame] * (MAX_KEYFRAMES + 1))
    with pytest.raises(ValueError, match="keyframe 1"):
        run_storyboard(tiny_interp, "fixed", [frame, frame[:, :32]])
    with pytest.raises(ValueError, match="3 prompts for 2 segments"):
        run_storyboard(tiny_interp, "fixed", [frame] * 3, ["a", "b", "c"])
    assert segment_prompts(["a", "b", "c"], 3) == ["a", "b", "c"] and segment_prompts("a", 2) == ["a", "a"]


# ------------------------------------------------------------------------------------------- extend
def test_extend_continues_from_the_last_frame(tiny):
    previous = torch.rand(3, 5, 64, 64) * 2 - 1
    result = extend_video(tiny, "fixed", previous, "waves", frames=6, ddim_steps=2,
                          generator=torch.Generator().manual_seed(1))
    assert result.video.shape == (3, 5 + 6 - 1, 64, 64)
    assert torch.equal(result.video[:, :5], previous)
    # The continuation is an ordinary long image-to-video run of the last frame, without its first frame.
    alone = run_synthesis(tiny, "fixed", ["waves"], previous[:, -1:].repeat(1, T, 1, 1).unsqueeze(0),
                          [1, 4, 6, 8, 8], ddim_steps=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(result.video[:, 5:], alone.videos[0, 0, :, 1:])


def test_extend_refuses_interpolation_models_and_wrong_sizes(tiny, tiny_interp):
    with pytest.raises(ValueError, match="interpolation model"):
        extend_video(tiny_interp, "fixed", torch.zeros(3, 4, 64, 64))
    with pytest.raises(ValueError, match="expected"):
        extend_video(tiny, "fixed", torch.zeros(3, 4, 32, 64))


def test_last_frame_reads_the_final_frame_and_enforces_limits(tmp_path):
    # Four flat frames of distinct grey levels: the last one is told apart through H.264's loss.
    levels = [-0.8, -0.2, 0.3, 0.9]
    frames = torch.stack([torch.full((3, 64, 96), v) for v in levels], dim=1)
    path = write_mp4(frames, tmp_path / "clip.mp4", fps=8)
    last = last_frame(path)
    assert last.shape == (64, 96, 3) and last.dtype == np.uint8
    assert abs(float(last.mean()) - (0.9 + 1) * 127.5) < 3
    with pytest.raises(InputError, match="limit is"):
        last_frame(path, max_bytes=100)
    with pytest.raises(InputError, match="lasts"):
        last_frame(path, max_seconds=0.1)
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(InputError, match="video"):
        last_frame(tmp_path / "notes.mp4")
    with pytest.raises(InputError, match="no such file"):
        last_frame(tmp_path / "missing.mp4")
