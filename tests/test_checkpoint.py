"""Checkpoint I/O: HF layout round trips, shards, atomic writes, and clear errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import geode
from geode import CheckpointError
from geode.config import get_preset
from tests.reference import hf_text_config


def _tiny(seed: int = 0) -> geode.Transformer:
    """A random geode model whose norms are randomised too."""
    config = geode.ModelConfig.from_hf(hf_text_config().to_dict())
    model = geode.build_model(config, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return model.eval()


def test_geode_saves_transformers_loads_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _tiny()
    geode.save_model(model, tmp_path / "ckpt")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="eager")
    ids = torch.randint(0, 300, (2, 19))
    with torch.no_grad():
        assert (ref(ids).logits - model(ids)).abs().max().item() <= 1e-4
    reloaded = geode.load_model(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(reloaded(ids), model(ids))


def test_bfloat16_round_trip_is_bitwise(tmp_path):
    model = _tiny().to(torch.bfloat16)
    geode.save_model(model, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    back = geode.load_model(tmp_path / "bf16")
    assert back.dtype == torch.bfloat16
    for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n


def test_sharded_checkpoints_load(tmp_path, hf_checkpoint):
    model = _tiny(1)
    geode.save_model(model, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(geode.load_model(tmp_path / "sharded")(ids), model(ids))
    # transformers' own sharding
    ref, _ = hf_checkpoint(seed=2)
    ref.save_pretrained(tmp_path / "hf-sharded", max_shard_size="30KB")
    assert (tmp_path / "hf-sharded" / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        got = geode.load_model(tmp_path / "hf-sharded")(ids)
        assert (got - ref(ids).logits).abs().max().item() <= 1e-4


def test_dtype_conversion_and_float16_refusal(tmp_path):
    geode.save_model(_tiny(), tmp_path / "c")
    assert geode.load_model(tmp_path / "c", dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="#36822"):
        geode.load_model(tmp_path / "c", dtype=torch.float16)
    forced = geode.load_model(tmp_path / "c", dtype="float16", allow_float16=True)
    assert forced.dtype == torch.float16
    with pytest.raises(ValueError, match="float16"):
        geode.build_model(get_preset("nano-1m"), dtype=torch.float16)


def test_extra_files_are_copied_and_existing_dir_replaced(tmp_path):
    extra = tmp_path / "tokenizer.model"
    extra.write_bytes(b"spm")
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    geode.save_model(_tiny(), target, files={"tokenizer.model": extra})
    assert (target / "tokenizer.model").read_bytes() == b"spm"
    assert not (target / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failed_save_leaves_nothing_behind(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(FileNotFoundError):
        geode.save_model(_tiny(), target, files={"tokenizer.model": tmp_path / "absent"})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- bad input
@pytest.fixture
def saved(tmp_path) -> Path:
    """A valid single-file checkpoint to break in various ways."""
    return geode.save_model(_tiny(), tmp_path / "ok")


def _rewrite(ckpt: Path, edit) -> None:
    state = load_file(ckpt / "model.safetensors")
    edit(state)
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})


def test_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json.*missing"):
        geode.load_model(saved)


def test_unknown_model_type(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model_type"] = "llama"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown model_type 'llama'"):
        geode.load_model(saved)


def test_missing_tensor(saved):
    _rewrite(saved, lambda s: s.pop("model.layers.3.mlp.up_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing tensor 'layers\.3\.mlp\.up_proj\.weight'.*\[96, 64\]"
    ):
        geode.load_model(saved)


def test_unexpected_tensor(saved):
    _rewrite(saved, lambda s: s.update({"model.layers.99.extra.weight": torch.zeros(2)}))
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.99"
    ):
        geode.load_model(saved)
    _rewrite(
        saved,
        lambda s: (s.pop("model.layers.99.extra.weight"), s.update({"foo.bar": torch.zeros(2)})),
    )
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'foo\.bar'"):
        geode.load_model(saved)


def test_wrong_shape(saved):
    _rewrite(
        saved, lambda s: s.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(95, 64)})
    )
    with pytest.raises(
        CheckpointError,
        match=r"'model\.layers\.0\.self_attn\.q_proj\.weight' has shape \[95, 64\], expected \[96, 64\]",
    ):
        geode.load_model(saved)


def test_truncated_file(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated.*tensor '"):
        geode.load_model(saved)
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        geode.load_model(saved)


def test_corrupted_header_and_values(saved):
    f = saved / "model.safetensors"
    data = bytearray(f.read_bytes())
    bad = data.copy()
    bad[8:20] = b"\x00garbage!!\xff\xfe"
    f.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupted safetensors header"):
        geode.load_model(saved)
    _rewrite_bytes = data.copy()
    f.write_bytes(bytes(_rewrite_bytes))
    _rewrite(saved, lambda s: s["model.norm.weight"].__setitem__(3, float("nan")))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' contains NaN"):
        geode.load_model(saved)


def test_missing_shard_and_pickle_only(saved, tmp_path):
    geode.save_model(_tiny(), tmp_path / "sh", max_shard_bytes=40_000)
    (tmp_path / "sh" / "model-00002-of-00003.safetensors").unlink(missing_ok=True)
    shards = sorted((tmp_path / "sh").glob("model-*.safetensors"))
    shards[0].unlink()
    with pytest.raises(
        CheckpointError, match=r"lists shard model-0000\d-of-\d+\.safetensors, which is missing"
    ):
        geode.load_model(tmp_path / "sh")
    (saved / "model.safetensors").unlink()
    (saved / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="pickle weights are never loaded"):
        geode.load_model(saved)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        geode.load_model(tmp_path / "nowhere")


_PEAK = """
import resource, sys, torch, geode
torch.set_num_threads(1)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = geode.load_model(sys.argv[1])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) * 1024)
"""


def test_loading_peak_memory_is_near_one_copy(tmp_path):
    """Built on the meta device, tensors read one at a time: peak ~ one copy of the weights."""
    model = geode.build_model(get_preset("nano-20m"), seed=0)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    geode.save_model(model, tmp_path / "m")
    del model
    out = subprocess.run(
        [sys.executable, "-c", _PEAK, str(tmp_path / "m")],
        capture_output=True,
        text=True,
        check=True,
    )
    growth = int(out.stdout.strip())
    assert growth < 1.5 * nbytes, (
        f"peak grew {growth / 1e6:.0f} MB for {nbytes / 1e6:.0f} MB of weights"
    )
