"""`geode info`: parameter counts and the KV-cache formula written in docs/architecture.md."""

from __future__ import annotations

import json

import torch

import geode
from geode.cli import main
from geode.config import get_preset
from geode.infer.cache import kv_cache_bytes
from geode.info import layer_pattern, model_summary


def test_gemma3_4b_kv_cache_matches_the_formula(capsys):
    """bytes(n) = 2 * H_kv * D * b * (L_global * n + L_local * min(n, W)), b = 2 for bfloat16."""
    assert main(["info", "gemma3-4b", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    hkv, d, b, w = 4, 256, 2, 1024  # gemma3-4b: 4 KV heads x 256, window 1024
    lg, ll = 5, 29  # 34 layers, every 6th global
    assert (s["global_layers"], s["local_layers"]) == (lg, ll)
    for label, n in {"8K": 8192, "32K": 32768, "128K": 131072}.items():
        row = s["kv_cache"][label]
        assert row["full"] == 2 * hkv * d * b * (lg + ll) * n
        assert row["ring"] == 2 * hkv * d * b * (lg * n + ll * min(n, w))
    assert s["kv_bytes_per_token"] == 2 * hkv * d * b * 34
    assert s["kv_cache"]["32K"]["ring"] == 792_723_456  # 756 MiB vs 4.25 GiB without the ring


def test_text_output_and_checkpoint_dir(tmp_path, capsys):
    assert main(["info", "gemma3-27b"]) == 0
    out = capsys.readouterr().out
    assert "LLLLLG x 10 + LL" in out and "formula: bytes(n)" in out
    geode.save_model(geode.build_model(get_preset("nano-1m"), seed=0), tmp_path / "m")
    assert main(["info", str(tmp_path / "m"), "--dtype", "float32"]) == 0
    assert "1.1" in capsys.readouterr().out  # ~1.1 M parameters


def test_counts_equal_a_real_model_for_untied_config():
    cfg = get_preset("nano-1m").replace(tie_word_embeddings=False)
    s = model_summary(cfg)
    assert s["parameters"]["total"] == sum(p.numel() for p in geode.build_model(cfg).parameters())


def test_kv_bytes_dtype_and_pattern():
    cfg = get_preset("nano-1m")
    assert kv_cache_bytes(cfg, 10, torch.float32, ring_buffer=False) == 2 * 1 * 32 * 4 * 6 * 10
    assert (
        layer_pattern(cfg.replace(layer_types=("sliding_attention", "full_attention") * 3))
        == "LG x 3"
    )


def test_unknown_model_is_a_clear_cli_error(capsys):
    assert main(["info", "no-such-model"]) == 1
    assert "neither a checkpoint directory nor a preset" in capsys.readouterr().err
