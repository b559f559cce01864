"""Weight-only quantization and the CPU decode kernels: numerics against dequantized / plain
references, perplexity change on a briefly trained model, and the optimized model's parity."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

import geode
from geode.infer import Engine, Request, kernels
from geode.infer.optimize import optimize_for_decode, restore
from geode.infer.quant import (
    QuantLinear,
    dequantize_int4,
    quantize,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"{kernels.load_error()}")


@pytest.mark.parametrize("mode,group", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("rows", [1, 3, 16, 40])
def test_quantized_matmul_equals_dequantized_reference(mode, group, rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(72, 256, generator=g) * 0.05
    q = QuantLinear.from_weight(w, mode, group or 64, bias=torch.randn(72, generator=g))
    x = torch.randn(rows, 256, generator=g)
    with torch.no_grad():
        y = q(x)
    ref = x @ q.dequantized().t() + q.bias
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (q.dequantized() - w).abs().max() < (0.05 * 8 / (127 if mode == "int8" else 7.5))


@needs_kernels
@pytest.mark.parametrize("mode,group", [("int8", 0), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("rows", [1, 2, 7, 23, 64])
def test_quantized_kernels_in_one_call_equal_dequantized(mode, group, rows):
    """One gemv call over 1..64 rows, two weights sharing x (rows path and GEMM path)."""
    g = torch.Generator().manual_seed(rows)
    w1, w2 = torch.randn(70, 384, generator=g) * 0.05, torch.randn(13, 384, generator=g) * 0.05
    q1, q2 = (QuantLinear.from_weight(w, mode, group or 64) for w in (w1, w2))
    x = torch.randn(rows, 384, generator=g)
    y = kernels.gemv(x, kernels.GemvPlan([q1.kernel_spec(), q2.kernel_spec()]))
    ref = torch.cat([x @ q1.dequantized().t(), x @ q2.dequantized().t()], 1)
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_int4_packing_round_trip_and_error_bound():
    w = torch.randn(16, 128) * 0.1
    packed, scale, mins = quantize_int4(w, 32)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 64)
    assert scale.dtype == torch.float16 and scale.shape == (16, 4)
    q = unpack_int4(packed)
    assert q.max() <= 15
    deq = dequantize_int4(packed, scale, mins, 32)
    # round to nearest: at most half a step per weight (plus float16 rounding of s and m)
    step = scale.float().repeat_interleave(32, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-3).all()
    q8, s8 = quantize_int8(w)
    assert ((q8.float() * s8[:, None] - w).abs() <= s8[:, None] / 2 + 1e-7).all()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 16, 23, 64])  # rows path below 6, GEMM path above
@pytest.mark.parametrize("packed", [False, True])
def test_float_kernels_equal_torch(dtype, rows, packed):
    # odd sizes: scalar tails; 130 rows = 21 tiles of 6 + 4 padded rows, groups of 8 tiles
    # split across the two weights' boundary; 200 columns = slices of 128 + 72
    w = torch.randn(130, 200).to(dtype)
    w2 = torch.randn(47, 200).to(dtype)
    kind = "f32" if dtype == torch.float32 else "bf16"
    specs = [kernels.WeightSpec(kind, t if dtype == torch.float32 else t.view(torch.int16))
             for t in (w, w2, w)]  # fmt: skip
    x = torch.randn(rows, 200)
    y = kernels.gemv(x, kernels.GemvPlan(specs, packed=packed))
    ref = torch.cat([x @ t.float().t() for t in (w, w2, w)], dim=1)
    assert (y - ref).abs().max() < 1e-4


@needs_kernels
def test_pack_refuses_quantized_weights():
    q = quantize_int8(torch.randn(12, 64))
    with pytest.raises(ValueError, match="only float32 / bfloat16"):
        kernels.pack(kernels.WeightSpec("i8", q[0], q[1]))


def test_optimized_model_equals_plain(model):
    model = restore(copy.deepcopy(model))  # the plain classes, whatever other tests did
    fast = optimize_for_decode(copy.deepcopy(model))
    assert list(fast.state_dict()) == list(model.state_dict())
    ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (fast(ids) - model(ids)).abs().max() < 1e-5
        assert (fast(ids[:1, :3]) - model(ids[:1, :3])).abs().max() < 1e-5  # kernel-sized
    copy.deepcopy(fast)  # kernel caches are not copied
    out = fast(ids)  # autograd on: the plain forward, gradients flow
    out.sum().backward()
    assert fast.layers[0].mlp.gate_proj.weight.grad is not None
    assert type(restore(fast).layers[0].mlp).__name__ == "GatedMLP"


def _trained_tiny(steps: int = 50) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny model trained briefly on a noisy periodic sequence (confident, non-trivial)."""
    cfg = geode.ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                            head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
                            max_position_embeddings=128)  # fmt: skip
    model = geode.build_model(cfg, seed=0)
    g = torch.Generator().manual_seed(0)

    def batch(n: int) -> torch.Tensor:
        start = torch.randint(0, 7, (n, 1), generator=g)
        seq = (start + torch.arange(48)) % 7 * 3 + 3  # period 7 over ids 3..21
        noise = torch.rand(seq.shape, generator=g) < 0.1
        return torch.where(noise, torch.randint(3, 64, seq.shape, generator=g), seq)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x = batch(8)
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), batch(32), loss.detach()


def _ppl(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(x[:, :-1]).float()
    return math.exp(torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()))


def test_perplexity_change_of_quantization_is_small():
    model, held, _ = _trained_tiny()
    base = _ppl(model, held)
    assert base < 10  # it learned something (uniform would be 64)
    p8 = _ppl(quantize(copy.deepcopy(model), "int8"), held)
    p4 = _ppl(quantize(copy.deepcopy(model), "int4", 32), held)
    assert abs(p8 / base - 1) < 0.01
    assert abs(p4 / base - 1) < 0.10


def test_quantized_model_generates(model):
    q = quantize(copy.deepcopy(model), "int8")
    r = Engine(q).generate(Request([5, 6, 7], temperature=0, max_new_tokens=6, ignore_eos=True))
    ref = Engine(copy.deepcopy(model)).generate(
        Request([5, 6, 7], temperature=0, max_new_tokens=6, ignore_eos=True)
    )
    assert len(r[0].token_ids) == 6
    assert r[0].token_ids[:2] == ref[0].token_ids[:2]  # int8 is close to float on the first steps


def test_bad_quantization_arguments(model):
    with pytest.raises(ValueError, match="group_size"):
        quantize(copy.deepcopy(model), "int4", 48)
    with pytest.raises(ValueError, match="mode"):
        quantize(copy.deepcopy(model), "int3")
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize(copy.deepcopy(model), "int4", 128)  # widths 64 and 96


# ------------------------------------------------------------ quantized checkpoints
def _plain(model):
    return restore(copy.deepcopy(model))  # the plain classes, whatever other tests did


@pytest.mark.parametrize("mode,group,head", [("int8", 64, True), ("int4", 32, True),
                                             ("int4", 128, False)])  # fmt: skip
def test_quantized_checkpoint_loads_back_as_saved(tmp_path, mode, group, head):
    q = quantize(geode.build_model(geode.get_preset("nano-1m"), seed=0), mode, group, head=head)
    geode.save_model(q, tmp_path / "q")
    back = geode.load_model(tmp_path / "q")
    assert back.quantization == q.quantization  # quantized on load, not re-quantized
    a, b = q.state_dict(), back.state_dict()
    assert list(a) == list(b) and all(
        torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a
    )
    assert isinstance(back.layers[0].mlp.down_proj, QuantLinear)
    assert isinstance(back.head_override, QuantLinear) == head
    req = Request([5, 6, 7], temperature=0, max_new_tokens=8, ignore_eos=True)
    assert Engine(back).generate(req)[0].token_ids == Engine(q).generate(req)[0].token_ids
    with pytest.raises(ValueError, match="already quantized"):
        quantize(back, "int8")
    bf = geode.load_model(tmp_path / "q", dtype="bfloat16")  # float tensors follow `dtype`
    assert bf.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(
        bf.layers[0].self_attn.q_proj.qweight, b["layers.0.self_attn.q_proj.qweight"]
    )


@pytest.mark.parametrize("mode,group", [("int8", 64), ("int4", 32), ("int4", 128)])
def test_stored_layout_is_compressed_tensors(mode, group):
    """compressed-tensors' own decompressors read geode's tensors as geode's weights."""
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    from geode.infer.quant import quantization_config, quantized_state

    q = quantize(geode.build_model(geode.get_preset("nano-1m"), seed=0), mode, group, head=False)
    state = quantized_state(q)
    spec = quantization_config(q)["config_groups"]["group_0"]
    scheme = QuantizationScheme(
        targets=spec["targets"], weights=spec["weights"], format=spec["format"]
    )
    comp = PackedQuantizationCompressor if mode == "int4" else IntQuantizationCompressor
    linears = [(n, m) for n, m in q.named_modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 7 * len(q.layers)
    for name, m in linears:
        pre = f"model.{name}."
        w = comp.decompress(
            {k[len(pre) :]: v for k, v in state.items() if k.startswith(pre)}, scheme
        )
        step = m.scale.float().max()
        # equal up to compressed-tensors computing (q - z) * s in float16 (geode: q * s + m)
        assert (w["weight"].float() - m.dequantized()).abs().max() <= (
            0.01 if mode == "int4" else 0
        ) * step
    assert "model.layers.0.self_attn.q_proj.weight" not in state or mode == "int8"


def test_transformers_loads_the_quantized_checkpoint(pair, tmp_path):
    """int8: transformers + compressed-tensors computes exactly geode's logits; int4 with
    dequantize=True equal up to float16 rounding; the geode LM head is ignored there."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    ref, model = pair
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    for mode, head in [("int8", False), ("int4", False), ("int8", True)]:
        q = quantize(_plain(model), mode, 32, head=head)
        geode.save_model(q, tmp_path / f"{mode}{head}")
        kw = (
            {"quantization_config": CompressedTensorsConfig(dequantize=True)}
            if mode == "int4"
            else {}
        )
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / f"{mode}{head}", **kw)
        q.head_override = None  # transformers uses the float (tied) head
        with torch.no_grad():
            ours, theirs, plain = q(ids), hf(ids).logits, model(ids)
        scale = plain.abs().max()
        assert (ours - theirs).abs().max() <= (1e-5 if mode == "int8" else 5e-3) * scale
        assert (ours - plain).abs().max() > 10 * (ours - theirs).abs().max()  # it is quantized


def _rewrite(path, edit_config=None, edit_tensors=None):
    import json

    from safetensors.torch import load_file, save_file

    cfg = json.loads((path / "config.json").read_text())
    if edit_config:
        edit_config(cfg["quantization_config"])
        (path / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        tensors = load_file(path / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, path / "model.safetensors")


def test_bad_quantized_checkpoints_name_the_field_or_tensor(model, tmp_path):
    import shutil

    from geode.checkpoint import CheckpointError

    geode.save_model(quantize(_plain(model), "int4", 32), tmp_path / "good")
    key = "model.layers.1.mlp.up_proj.weight_packed"
    cases = [
        (lambda c: c.update(quant_method="gptq"), None, "quant_method='gptq'"),
        (lambda c: c.update(format="float-quantized"), None, "format='float-quantized'"),
        (lambda c: c["config_groups"]["group_0"]["weights"].update(group_size=48), None, "group_size=48"),
        (lambda c: c["config_groups"]["group_0"]["weights"].update(num_bits=3), None, "weights="),
        (lambda c: c.update(ignore=[]), None, "ignore=[]"),
        (None, lambda t: t.pop(key), f"missing tensor {key!r}"),
        (None, lambda t: t.update({key: t[key].to(torch.int64)}), f"{key!r} is torch.int64"),
        (None, lambda t: t.update({key: t[key][:, :-1].contiguous()}), f"{key!r} is torch.int32 [96, 7]; expected torch.int32 [96, 8]"),
        (None, lambda t: t.update({"model.extra": torch.zeros(1)}), "unexpected tensor 'model.extra'"),
        (None, lambda t: t["model.norm.weight"].fill_(float("nan")), "NaN"),
    ]  # fmt: skip
    for i, (cfg, tensors, message) in enumerate(cases):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(tmp_path / "good", bad)
        _rewrite(bad, cfg, tensors)
        with pytest.raises(CheckpointError, match=re.escape(message)):
            geode.load_model(bad)


def test_symmetric_int4_from_compressed_tensors_loads(model, tmp_path):
    """A symmetric pack-quantized checkpoint as llm-compressor's W4A16 writes it (no zero
    points) loads with compressed-tensors' weights."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    q = quantize(_plain(model), "int4", 32, head=False)
    geode.save_model(q, tmp_path / "q")
    spec = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
    scheme = QuantizationScheme(targets=["Linear"], weights=spec, format="pack-quantized")
    plain = _plain(model)
    expect = {}

    def resymmetrize(t):
        for name, m in plain.named_modules():
            if isinstance(m, torch.nn.Linear) and name.startswith("layers."):
                w = m.weight.detach().view(m.out_features, -1, 32)
                s = (w.abs().amax(-1) / 7.5).clamp(min=1e-8)  # (N, K/G)
                full = {"weight": m.weight.detach(), "weight_scale": s}
                out = PackedQuantizationCompressor.compress(full, scheme)
                pre = f"model.{name}."
                for k in [k for k in t if k.startswith(pre)]:
                    del t[k]
                t.update({pre + k: v for k, v in out.items()})
                expect[name] = PackedQuantizationCompressor.decompress(out, scheme)["weight"]

    _rewrite(tmp_path / "q", lambda c: c["config_groups"]["group_0"]["weights"].update(spec),
             resymmetrize)  # fmt: skip
    back = geode.load_model(tmp_path / "q")
    for name, w in expect.items():
        m = back.get_submodule(name)
        # equal up to geode keeping the (float32 here) scales in float16: |q'| * 2^-11 steps
        assert (m.dequantized() - w.float()).abs().max() <= 8 * 2**-11 * m.scale.float().max()


def test_cli_quantize_writes_what_generate_quant_computes(model, tmp_path, capsys):
    import json

    from geode.cli import main

    geode.save_model(_plain(model), tmp_path / "f")
    assert main(["quantize", str(tmp_path / "f"), str(tmp_path / "q"), "--int4",
                 "--group-size", "32"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'q'} (int4, group 32; LM head int4)" in out
    assert f"next: geode generate {tmp_path / 'q'}" in out
    gen = ["--ids", "2,5,9", "--temperature", "0", "--max-new-tokens", "6", "--ignore-eos",
           "--logprobs", "1", "--json"]  # fmt: skip
    assert main(["generate", str(tmp_path / "q"), *gen]) == 0
    saved = json.loads(capsys.readouterr().out)
    assert (
        main(["generate", str(tmp_path / "f"), "--quant", "int4", "--group-size", "32", *gen]) == 0
    )
    fresh = json.loads(capsys.readouterr().out)
    assert saved["token_ids"] == fresh["token_ids"] and saved["logprobs"] == fresh["logprobs"]
    # bad input: nothing written
    assert main(["quantize", str(tmp_path / "q"), str(tmp_path / "x"), "--int8"]) == 2
    assert "already quantized (int4)" in capsys.readouterr().err
    assert (
        main(["quantize", str(tmp_path / "f"), str(tmp_path / "x"), "--int8", "--group-size", "32"])
        == 2
    )
    assert main(["quantize", str(tmp_path / "nope"), str(tmp_path / "x"), "--int4"]) == 1
    assert "neither a checkpoint directory nor a preset" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
