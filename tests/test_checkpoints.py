"""The real loading path, end to end and offline: official file layouts, a fake Hub cache, bad files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY
from dc_app import load_pretrained
from dc_app.loading.checkpoints import CheckpointError, local_checkpoint_path, read_checkpoint
from dc_app.loading.spec import load_model_config, model_spec

ROOT = Path(__file__).resolve().parent.parent
FAKE_REPO = "Doubiiu/DynamiCrafter_tinyfake"


@pytest.fixture(scope="module")
def tiny_state(tiny_weights):
    return {k: v.clone() for k, v in tiny_weights.items()}


@pytest.fixture()
def tiny_yaml(tmp_path):
    """The tiny config under a name of its own, pointing at a (fake) Hub repo."""
    text = (ROOT / "dc_app" / "configs" / "tiny.yaml").read_text()
    weights = ("weights:\n  hub_repo: null\n  hub_file: null\n  local_checkpoint: null\n  random_seed: 0\n")
    assert weights in text
    text = text.replace(weights, f"weights:\n  hub_repo: {FAKE_REPO}\n  hub_file: model.ckpt\n"
                                 f"  local_checkpoint: dynamicrafter_tinyhub_v1/model.ckpt\n  random_seed: null\n")
    path = tmp_path / "tinyhub.yaml"
    path.write_text(text)
    return path


def _fake_hub_cache(cache: Path, repo: str, payload) -> Path:
    """Lay out a Hugging Face cache holding `model.ckpt` for `repo`, as huggingface_hub writes it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    torch.save(payload, snapshot / "model.ckpt")
    return snapshot / "model.ckpt"


def _assert_same_weights(model, state):
    sd = model.state_dict()
    for key, value in state.items():
        assert torch.equal(sd[key], value), key


def test_official_layout_from_fake_hub_cache_offline(tmp_path, tiny_yaml, tiny_state):
    """A `{"state_dict": ...}` file served from the HF cache under $HF_HOME, with HF_HUB_OFFLINE=1."""
    hf_home = tmp_path / "hf"
    _fake_hub_cache(hf_home / "hub", FAKE_REPO, {"state_dict": tiny_state})
    script = (
        "import json, sys, torch\n"
        "from dc_app import load_pretrained\n"
        f"m = load_pretrained({str(tiny_yaml)!r}, device='cpu')\n"
        f"ref = __import__('safetensors.torch', fromlist=['load_file']).load_file({str(TINY / 'weights.safetensors')!r})\n"
        "print(json.dumps({'equal': all(torch.equal(m.state_dict()[k], v) for k, v in ref.items()),"
        " 'meta_left': [n for n, b in m.named_buffers() if b.device.type == 'meta']}))\n"
    )
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", DC_APP_CHECKPOINTS=str(tmp_path / "none"))
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"equal": True, "meta_left": []}


def test_offline_without_cache_names_what_to_do(tmp_path, tiny_yaml):
    env = dict(os.environ, HF_HOME=str(tmp_path / "empty"), HF_HUB_OFFLINE="1", DC_APP_CHECKPOINTS=str(tmp_path))
    script = f"from dc_app import load_pretrained\nload_pretrained({str(tiny_yaml)!r}, device='cpu')\n"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "CheckpointError" in out.stderr and FAKE_REPO in out.stderr and "HF_HUB_OFFLINE" in out.stderr


def test_upstream_local_layout_is_used_as_is(tmp_path, tiny_yaml, tiny_state, monkeypatch):
    path = local_checkpoint_path(model_spec(load_model_config(str(tiny_yaml))), tmp_path)
    assert path == tmp_path / "dynamicrafter_tinyhub_v1" / "model.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": tiny_state}, path)
    monkeypatch.setenv("DC_APP_CHECKPOINTS", str(tmp_path))
    _assert_same_weights(load_pretrained(str(tiny_yaml), device="cpu"), tiny_state)


def test_256_framestride_names_are_renamed(tmp_path, tiny_state):
    old_names = {k.replace("fps_embedding", "framestride_embed"): v for k, v in tiny_state.items()}
    assert sum("framestride_embed" in k for k in old_names) == 4
    torch.save({"state_dict": old_names}, tmp_path / "model.ckpt")
    model = load_pretrained("tiny", device="cpu", checkpoint=tmp_path / "model.ckpt")
    _assert_same_weights(model, tiny_state)


def test_deepspeed_module_layout(tmp_path, tiny_state):
    wrapped = {"module": {"_forward_module." + k: v for k, v in tiny_state.items()}}
    torch.save(wrapped, tmp_path / "ds.ckpt")
    assert set(read_checkpoint(tmp_path / "ds.ckpt")) == set(tiny_state)


def test_metadata_objects_load_without_running_their_code(tmp_path, tiny_state):
    import argparse

    torch.save({"state_dict": tiny_state, "hparams": argparse.Namespace(lr=1e-4)}, tmp_path / "meta.ckpt")
    assert set(read_checkpoint(tmp_path / "meta.ckpt")) == set(tiny_state)


def test_truncated_checkpoint_gives_clear_error(tmp_path, tiny_state):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": tiny_state}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_pretrained("tiny", device="cpu", checkpoint=path)
    assert str(path) in str(err.value)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_payload_is_refused(tmp_path, tiny_state):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": tiny_state, "x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refused") as err:
        load_pretrained("tiny", device="cpu", checkpoint=path)
    assert str(path) in str(err.value) and "system" in str(err.value)
    assert not marker.exists(), "the payload ran"


def test_wrong_model_keys_are_reported_before_use(tmp_path, tiny_state):
    partial = {k: v for k, v in tiny_state.items() if not k.startswith("image_proj_model.")}
    partial["extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": partial}, tmp_path / "model.ckpt")
    with pytest.raises(CheckpointError, match="missing") as err:
        load_pretrained("tiny", device="cpu", checkpoint=tmp_path / "model.ckpt")
    assert "unexpected" in str(err.value) and "image_proj_model." in str(err.value)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as err:
        read_checkpoint(tmp_path / "nope.ckpt")
    assert "nope.ckpt" in str(err.value)


def test_tiny_random_weights_are_seeded_and_live():
    a = load_pretrained("tiny", device="cpu")
    b = load_pretrained("tiny", device="cpu")
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
        assert pa.abs().sum() > 0, f"{name} is all zeros"
