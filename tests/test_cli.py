"""`python -m dc_app generate|batch` on the tiny model: real processes, real mp4 files, real sidecars."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from dc_app.__main__ import Item, build_parser, main, read_items, shard

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
TINY_FRAMES, TINY_SIZE = 4, (64, 64)  # dc_app/configs/tiny.yaml: temporal_length 4, latent 8x8 -> 64x64 pixels


def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "dc_app", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def read_video(path: Path) -> np.ndarray:
    return iio.imread(path, index=None, plugin="FFMPEG")  # (frames, H, W, 3) uint8


def image_folder(tmp_path: Path, names: list[str]) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in names:
        shutil.copy(ASSETS / f"{name}.jpg", folder / f"{name}.jpg")
    return folder


def test_generate_writes_a_playable_mp4_and_a_sidecar_with_every_setting(tmp_path):
    out = tmp_path / "nested" / "cat.mp4"
    proc = run_cli(
        "generate", "--model", "tiny", "--image", str(ASSETS / "chelsea.jpg"), "--prompt", "a cat turning its head",
        "--out", str(out), "--steps", "2", "--eta", "0.5", "--cfg-scale", "5", "--fs", "20", "--seed", "123",
        "--guidance-rescale", "0.3", "--timestep-spacing", "uniform", "--sampler", "fixed",
    )
    assert proc.returncode == 0, proc.stderr
    frames = read_video(out)
    assert frames.shape == (TINY_FRAMES, *TINY_SIZE, 3)
    assert frames.std() > 1.0, "a constant video"
    meta = json.loads(out.with_suffix(".json").read_text())
    expected = dict(model="tiny", sampler="fixed", prompt="a cat turning its head", seed=123, steps=2, eta=0.5,
                    cfg_scale=5.0, fs=20, guidance_rescale=0.3, timestep_spacing="uniform")
    assert {k: meta[k] for k in expected} == expected
    assert meta["versions"]["dc_app"] and meta["versions"]["torch"]
    # Only the result and its sidecar are left: the service's working folder is gone.
    assert sorted(p.name for p in out.parent.iterdir()) == ["cat.json", "cat.mp4"]
    # The progress bar ran to the last step the sampler took, and the report names the seed.
    n = len(meta["ddim_timesteps"])
    assert f"{n}/{n}" in proc.stderr
    assert "seed 123" in proc.stdout


def test_generate_compare_writes_black_stock_and_finite_fixed(tmp_path):
    out = tmp_path / "cmp.mp4"
    # 7 uniform_trailing steps at eta 1: upstream's sqrt(1 - a_prev - sigma^2) is NaN at the first step.
    proc = run_cli("generate", "--model", "tiny", "--image", str(ASSETS / "coffee.jpg"), "--out", str(out),
                   "--steps", "7", "--eta", "1", "--timestep-spacing", "uniform_trailing", "--seed", "5", "--compare")
    assert proc.returncode == 0, proc.stderr
    stock, fixed = read_video(tmp_path / "cmp.stock.mp4"), read_video(out)
    assert stock.max() == 0, "stock NaN frames are rendered black"
    assert fixed.std() > 1.0
    assert json.loads((tmp_path / "cmp.stock.json").read_text())["sampler"] == "stock"
    assert json.loads((tmp_path / "cmp.json").read_text())["sampler"] == "fixed"
    assert "NaN from step 1 of 7" in proc.stdout


def test_batch_over_a_folder_writes_one_result_per_image(tmp_path):
    folder = image_folder(tmp_path, ["chelsea", "coffee"])
    (folder / "coffee.txt").write_text("steam rising\n")
    out_dir = tmp_path / "out"
    proc = run_cli("batch", "--model", "tiny", "--input", str(folder), "--out-dir", str(out_dir),
                   "--steps", "2", "--seed", "7")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["chelsea.json", "chelsea.mp4", "coffee.json", "coffee.mp4"]
    for name, prompt in (("chelsea", ""), ("coffee", "steam rising")):
        assert read_video(out_dir / f"{name}.mp4").shape[0] == TINY_FRAMES
        meta = json.loads((out_dir / f"{name}.json").read_text())
        assert (meta["prompt"], meta["seed"], meta["steps"]) == (prompt, 7, 2)


def test_batch_under_torchrun_env_runs_only_its_shard(tmp_path):
    folder = image_folder(tmp_path, ["astronaut", "chelsea", "coffee"])
    out_dir = tmp_path / "out"
    proc = run_cli("batch", "--model", "tiny", "--input", str(folder), "--out-dir", str(out_dir), "--steps", "1",
                   env_extra={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert proc.returncode == 0, proc.stderr
    # Sorted names: astronaut (0), chelsea (1), coffee (2); rank 1 of 2 takes item 1 only.
    assert sorted(p.name for p in out_dir.iterdir()) == ["chelsea.json", "chelsea.mp4"]


def test_shard_splits_rank_stride():
    items = [Item(str(i), Path(f"{i}.png"), "") for i in range(7)]
    picked = {r: [it.name for it in shard(items, {"RANK": str(r), "WORLD_SIZE": "3"})] for r in range(3)}
    assert picked == {0: ["0", "3", "6"], 1: ["1", "4"], 2: ["2", "5"]}
    assert [it.name for it in shard(items, {})] == [str(i) for i in range(7)]
    with pytest.raises(SystemExit):
        shard(items, {"RANK": "3", "WORLD_SIZE": "3"})


def test_read_items_from_csv_resolves_paths_and_deduplicates_names(tmp_path):
    (tmp_path / "imgs").mkdir()
    csv_file = tmp_path / "list.csv"
    csv_file.write_text('image,prompt,image2\nimgs/a.png,"wind, then rain",\nimgs/a.png,waves,imgs/b.png\n')
    items = read_items(csv_file)
    assert items == [
        Item("a", tmp_path / "imgs" / "a.png", "wind, then rain", None),
        Item("a-2", tmp_path / "imgs" / "a.png", "waves", tmp_path / "imgs" / "b.png"),
    ]


def test_read_items_from_folder_skips_non_images_and_reads_prompts(tmp_path):
    for name in ("b.png", "a.JPG", "notes.md", "a.txt"):
        (tmp_path / name).write_text("a breeze" if name == "a.txt" else "")
    items = read_items(tmp_path)
    assert [(it.name, it.image.name, it.prompt) for it in items] == [("a", "a.JPG", "a breeze"), ("b", "b.png", "")]


def test_invalid_settings_get_the_service_message_and_fail(tmp_path, capsys):
    out = tmp_path / "x.mp4"
    code = main(["generate", "--model", "tiny", "--image", str(ASSETS / "coffee.jpg"), "--out", str(out),
                 "--steps", "0"])
    assert code == 1
    assert "steps: expected a whole number from 1 to 1000, got 0" in capsys.readouterr().err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "nothing left behind, not even the working folder"


def test_image2_needs_the_interpolation_model(tmp_path):
    with pytest.raises(SystemExit, match="--image2 needs --model 512_interp"):
        main(["generate", "--model", "tiny", "--image", str(ASSETS / "coffee.jpg"),
              "--image2", str(ASSETS / "chelsea.jpg"), "--out", str(tmp_path / "x.mp4")])


def test_parser_leaves_unset_settings_to_the_model():
    args = build_parser().parse_args(["generate", "--image", "a.png", "--out", "a.mp4"])
    assert (args.model, args.sampler, args.seed, args.compare) == ("512", "fixed", -1, False)
    assert args.steps is args.eta is args.cfg_scale is args.fs is args.guidance_rescale is None
    assert args.timestep_spacing is args.perframe_ae is args.device is args.dtype is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--image", "a.png", "--out", "a.mp4", "--sampler", "Fixed"])


def test_batch_goes_on_after_a_bad_item_and_reports_it(tmp_path, capsys):
    folder = image_folder(tmp_path, ["coffee"])
    (folder / "broken.png").write_bytes(b"not an image")
    out_dir = tmp_path / "out"
    code = main(["batch", "--model", "tiny", "--input", str(folder), "--out-dir", str(out_dir), "--steps", "1"])
    assert code == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "coffee.jpg" not in err
    assert sorted(p.name for p in out_dir.iterdir()) == ["coffee.json", "coffee.mp4"]


def test_performance_options_give_a_playable_video_and_are_recorded(tmp_path):
    out = tmp_path / "fast.mp4"
    proc = run_cli("generate", "--model", "tiny", "--image", str(ASSETS / "chelsea.jpg"), "--out", str(out),
                   "--steps", "2", "--seed", "4", "--dtype", "bf16", "--decode-chunk-size", "2",
                   "--cfg-mode", "two-call", "--offload", "encoders")
    assert proc.returncode == 0, proc.stderr
    frames = read_video(out)
    assert frames.shape == (TINY_FRAMES, *TINY_SIZE, 3) and frames.std() > 1.0
    meta = json.loads(out.with_suffix(".json").read_text())
    expected = dict(dtype="bf16", vae_dtype="fp32", decode_chunk_size=2, cfg_mode="two-call", offload="encoders",
                    perframe_ae=False, device="cpu")
    assert {k: meta[k] for k in expected} == expected
    assert "peak_vram_bytes" not in meta and "VRAM" not in proc.stdout  # CPU: no VRAM figure


@pytest.mark.parametrize("flag, value, allowed", [
    ("--dtype", "fp8", "expected one of fp32, fp16, bf16, got 'fp8'"),
    ("--vae-dtype", "float16", "expected one of fp32, fp16, bf16, got 'float16'"),
    ("--offload", "gpu", "expected one of none, encoders, all, got 'gpu'"),
    ("--decode-chunk-size", "0", "expected a whole number of frames, 1 or more, got '0'"),
    ("--cfg-mode", "single", "expected one of batched, two-call, got 'single'"),
])
def test_bad_performance_values_are_refused_naming_the_option(flag, value, allowed, capsys):
    for command in (["generate", "--image", "a.png", "--out", "a.mp4"], ["batch", "--input", "x", "--out-dir", "y"]):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([*command, flag, value])
        assert exit_.value.code == 2
        assert f"error: argument {flag}: {allowed}" in capsys.readouterr().err


def test_performance_defaults():
    args = build_parser().parse_args(["batch", "--input", "x", "--out-dir", "y"])
    assert (args.dtype, args.vae_dtype, args.offload, args.decode_chunk_size, args.cfg_mode, args.compile) == \
        (None, "fp32", "none", None, "batched", False)
    args = build_parser().parse_args(["batch", "--input", "x", "--out-dir", "y", "--compile", "--decode-chunk-size",
                                      "3"])
    assert (args.compile, args.decode_chunk_size) == (True, 3)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde", "unipc"])
def test_every_multistep_sampler_makes_a_playable_mp4(tmp_path, sampler):
    out = tmp_path / "x.mp4"
    code = main(["generate", "--model", "tiny", "--image", str(ASSETS / "coffee.jpg"), "--out", str(out),
                 "--steps", "3", "--sampler", sampler, "--timestep-spacing", "logsnr", "--eta", "0.5", "--seed", "3"])
    assert code == 0
    frames = iio.imread(out)
    assert frames.shape == (4, 64, 64, 3) and frames.std() > 1
    record = json.loads(out.with_suffix(".json").read_text())
    assert (record["sampler"], record["timestep_spacing"], record["steps"]) == (sampler, "logsnr", 3)
    assert bool(record["notices"]) == (sampler != "dpmpp_2m_sde")  # the deterministic ones ignore eta 0.5


def test_storyboard_from_the_command_line(tmp_path):
    out = tmp_path / "board.mp4"
    keys = [ASSETS / "ball_up.png", ASSETS / "ball_down.png", ASSETS / "ball_up.png"]
    code = main(["generate", "--model", "tiny_interp", "--keyframes", *map(str, keys), "--prompts", "down", "up",
                 "--out", str(out), "--steps", "1", "--seed", "2"])
    assert code == 0 and iio.imread(out).shape == (7, 64, 64, 3)  # T = 4: (3 - 1)(4 - 1) + 1
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["long_video"]["keyframe_order"] == [0, 1, 2] and record["seed"] == 2


def test_extend_from_the_command_line(tmp_path):
    first, out = tmp_path / "first.mp4", tmp_path / "longer.mp4"
    assert main(["generate", "--model", "tiny", "--image", str(ASSETS / "coffee.jpg"), "--out", str(first),
                 "--steps", "1"]) == 0
    assert main(["generate", "--model", "tiny", "--extend", str(first), "--out", str(out), "--steps", "1",
                 "--frames", "4"]) == 0
    assert iio.imread(out).shape == (7, 64, 64, 3)
    assert json.loads(out.with_suffix(".json").read_text())["extend"]["joined_frames"] == 7


# ------------------------------------------------------------------------------------- the --low-vram preset
# The preset as the issue lists it (not read from dc_app.options): half precision, encoders and VAE offloaded,
# VAE decode one frame at a time, feed-forward chunking, 8-bit UNet weights, two-call CFG.
LOW_VRAM = dict(dtype="bf16", offload="all", decode_chunk_size=1, weights_dtype="int8", cfg_mode="two-call")
GENERATE = ["generate", "--image", "a.png", "--out", "a.mp4"]


def settled(args) -> dict:
    return {k: getattr(args, k) for k in LOW_VRAM}


def test_low_vram_sets_every_option_of_the_preset():
    args = build_parser().parse_args([*GENERATE, "--low-vram"])
    assert settled(args) == LOW_VRAM and args.vae_dtype == "fp32"  # an fp16 VAE is what blackens videos
    assert args.ff_chunk_size.tokens == 4096
    assert set(args.preset_options) == {*LOW_VRAM, "ff_chunk_size"}


def test_an_explicit_option_overrides_the_preset():
    args = build_parser().parse_args([*GENERATE, "--low-vram", "--cfg-mode", "batched", "--dtype", "fp32",
                                      "--ff-chunk-size", "64MiB", "--offload", "none"])
    assert (args.cfg_mode, args.dtype, args.offload) == ("batched", "fp32", "none")
    assert args.ff_chunk_size.budget_bytes == 64 * 2**20
    assert (args.decode_chunk_size, args.weights_dtype) == (1, "int8")
    assert set(args.preset_options) == {"decode_chunk_size", "weights_dtype"}


def test_without_the_preset_nothing_changes():
    args = build_parser().parse_args([*GENERATE, "--no-low-vram"])
    assert settled(args) == dict(dtype=None, offload="none", decode_chunk_size=None, weights_dtype=None,
                                 cfg_mode="batched")
    assert args.ff_chunk_size is None and args.preset_options == ()


def test_low_vram_leaves_a_temporal_decoder_its_own_chunk():
    args = build_parser().parse_args([*GENERATE, "--low-vram", "--model", "tooncrafter_tiny"])
    assert args.decode_chunk_size is None and "decode_chunk_size" not in args.preset_options
    assert args.weights_dtype == "int8"


def test_low_vram_picks_fp16_on_a_gpu_without_bf16(monkeypatch):
    import torch

    from dc_app.options import half_precision

    assert half_precision("cpu") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert half_precision("cuda") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert half_precision("cuda:0") == "bf16"


@pytest.mark.parametrize("flag, value, allowed", [
    ("--ff-chunk-size", "0", "expected a number of tokens (e.g. 4096) or a memory budget (e.g. 64MiB, 0.5GB), "
                             "got '0'"),
    ("--weights-dtype", "int4", "expected one of fp8, int8, got 'int4'"),
])
def test_bad_low_memory_values_are_refused_naming_the_option(flag, value, allowed, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*GENERATE, flag, value])
    assert exit_.value.code == 2
    assert f"error: argument {flag}: {allowed}" in capsys.readouterr().err


def test_low_vram_makes_a_playable_video_and_records_its_settings(tmp_path):
    out = tmp_path / "lean.mp4"
    assert main(["generate", "--model", "tiny", "--image", str(ASSETS / "chelsea.jpg"), "--out", str(out),
                 "--steps", "2", "--seed", "4", "--low-vram", "--device", "cpu"]) == 0
    frames = read_video(out)
    assert frames.shape == (TINY_FRAMES, *TINY_SIZE, 3) and frames.std() > 1.0
    meta = json.loads(out.with_suffix(".json").read_text())
    expected = dict(dtype="bf16", vae_dtype="fp32", offload="all", decode_chunk_size=1, cfg_mode="two-call",
                    weights_dtype="int8", ff_chunk_size="4096 tokens")
    assert {k: meta[k] for k in expected} == expected
    assert meta["memory_estimate"]["verdict"] == "fits"


def test_cli_estimate_for_a_gpu_this_machine_lacks(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["estimate", "--model", "512", "--device", "cuda", "--low-vram"]) == 0
    out = capsys.readouterr().out
    assert "512 model, 16 frames, on cuda: low-vram preset, bf16" in out
    assert out.rstrip().endswith("No CUDA device here to compare it with.") and "(with the CUDA context)" in out


def test_fp8_where_torch_lacks_it_is_a_message_not_a_traceback(tmp_path, monkeypatch):
    import torch

    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", "tiny", "--image", str(ASSETS / "chelsea.jpg"), "--out", str(tmp_path / "x.mp4"),
              "--weights-dtype", "fp8"])
    assert str(exit_.value).startswith("could not load the tiny model: fp8 weight storage needs torch.float8_e4m3fn")
    assert "--weights-dtype int8" in str(exit_.value) and not list(tmp_path.iterdir())
