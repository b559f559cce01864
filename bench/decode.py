"""Benchmark: the inference engine against transformers `generate`, same checkpoint, same run.

Parts (select with --parts, default all):
  bandwidth  this machine's copy bandwidth (STREAM convention, read + written bytes / s)
  b1         batch-1 greedy decode of nano-60m (random weights, float32): geode vs transformers
             generate, tokens/s and the fraction of the bandwidth roofline (bytes of weights +
             KV cache read per step / copy bandwidth)
  bf16       the same in bfloat16: geode bf16 vs geode f32 (interleaved in this part) and
             transformers bf16
  b16        batch-16 throughput: geode vs transformers batched generate (geode_unpacked: the
             engine with pack_weights=False, its GEMM reading the weights in place)
  kv         KV-cache bytes of gemma3-4b shapes at 32K tokens: geode (the formula) vs what
             transformers' DynamicCache and StaticCache hold (meta tensors: nothing allocated)
  quant      int8 / int4 (group 32/64/128) vs float32: batch-1 speed on nano-60m, perplexity
             change on held-out tinyshakespeare text of a small byte-level model trained here
  prefill    prefill time of 2K / 8K / 32K-token prompts on nano-5m (max context raised to 32K)
  gemm       the kernels' x W^T at M = 16 rows (batch-16 decode) on nano-60m's weight shapes,
             float32 and bfloat16 weights, read from packed copies (what the engine uses for
             batches of 6+) and in place from the rows: GFLOP/s against torch's F.linear

The engine runs each decode step as one native C call (geode/infer/native.py); b1 also
measures the engine's torch path (native=False: per-module kernels between torch ops).

Each timing is the median of --reps repetitions after a warm-up, geode and reference
interleaved. Prints one JSON line per measurement, then a table.

usage: python bench/decode.py [--parts b1,b16] [--reps 3] [--threads 2] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

import geode
from geode.infer import Engine, HybridCache, Request, kernels, kv_cache_bytes
from geode.infer.benchmark import (
    cache_bytes_read,
    copy_bandwidth,
    measure_decode,
    weight_bytes_per_token,
)
from geode.infer.quant import quantize

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
ROWS: list[dict] = []


def emit(**row) -> None:
    """Record a measurement and print it as a JSON line."""
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def hf_model(model: torch.nn.Module, dtype: torch.dtype, tmp: Path):
    """The same weights as a transformers Gemma3ForCausalLM (saved and loaded in HF layout)."""
    from transformers import Gemma3ForCausalLM

    path = tmp / f"ckpt-{len(list(tmp.iterdir()))}"
    geode.save_model(model, path)
    ref = Gemma3ForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return ref.eval()


def hf_decode(ref, batch: int, prompt_len: int, new: int, reps: int, seed: int = 0) -> dict:
    """transformers greedy generate: prefill = generate(1 token), decode rate excludes it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, ref.config.vocab_size, (batch, prompt_len), generator=g)
    mask = torch.ones_like(ids)

    def gen(n: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            ref.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                         min_new_tokens=n, pad_token_id=0, eos_token_id=None)  # fmt: skip
        return time.perf_counter() - t

    gen(2)
    pre, step = [], []
    for _ in range(reps):
        t1 = gen(1)
        tn = gen(new)
        pre.append(t1)
        step.append((tn - t1) / (new - 1))
    s = statistics.median(step)
    return {"prefill_s": statistics.median(pre), "step_ms": s * 1e3, "tokens_per_s": batch / s}


def interleaved(fns: dict, reps: int) -> dict:
    """Run each named measurement `reps` times, alternating, and keep medians per key."""
    out: dict[str, list[dict]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            out[k].append(f())
    return {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in out.items()}


# ---------------------------------------------------------------------- parts
def part_bandwidth(args, state) -> None:
    bw = statistics.median(copy_bandwidth() for _ in range(3))
    state["bw"] = bw
    emit(bench="bandwidth", copy_gb_s=bw / 1e9, threads=torch.get_num_threads())


def _nano60m(state, dtype=torch.float32):
    key = f"nano60m-{dtype}"
    if key not in state:
        base = state.setdefault("nano60m", geode.build_model(geode.get_preset("nano-60m"), seed=0))
        state[key] = copy.deepcopy(base).to(dtype)
    return state[key]


def _roofline(state, model, batch, ctx, tps) -> dict:
    # the higher of the run's first and a fresh copy-bandwidth measurement: a ceiling taken at a
    # slow minute would overstate the fraction (this host's bandwidth varies ~20-30%)
    bw = max(state.get("bw") or 0.0, copy_bandwidth())
    step_bytes = weight_bytes_per_token(model) + cache_bytes_read(model, ctx, model.dtype, batch)
    roof = batch * bw / step_bytes
    return {"bytes_per_step": step_bytes, "roofline_tokens_per_s": roof,
            "roofline_fraction": tps / roof}  # fmt: skip


def part_b1(args, state, dtype=torch.float32, name="b1") -> None:
    model = _nano60m(state, dtype)
    ref = hf_model(model, dtype, state["tmp"])
    eng = Engine(copy.deepcopy(model), max_batch=1)
    new = args.new_tokens
    hf_new = new if dtype == torch.float32 else min(new, 16)  # transformers bf16 is slow on CPU
    fns = {
        "geode": lambda: measure_decode(eng, 1, args.prompt_len, new, reps=1),
        "transformers": lambda: hf_decode(ref, 1, args.prompt_len, hf_new, reps=1),
    }
    if dtype == torch.float32:  # the engine without the native step, for comparison
        torch_path = Engine(copy.deepcopy(model), max_batch=1, native=False)
        fns["geode-torch-path"] = lambda: measure_decode(
            torch_path, 1, args.prompt_len, new, reps=1
        )
    else:  # our float32 engine interleaved too: the bf16 / f32 ratio from the same minutes
        f32 = Engine(copy.deepcopy(_nano60m(state)), max_batch=1)
        fns["geode-float32"] = lambda: measure_decode(f32, 1, args.prompt_len, new, reps=1)
    res = interleaved(fns, args.reps)
    ctx = args.prompt_len + new // 2
    for impl, r in res.items():  # same weights and cache bytes on both sides
        m, dt = (_nano60m(state), "float32") if impl == "geode-float32" else (model, str(dtype)[6:])
        emit(bench=name, impl=impl, model="nano-60m", dtype=dt, batch=1,
             tokens_per_s=r["tokens_per_s"], step_ms=r["step_ms"], prefill_s=r["prefill_s"],
             **_roofline(state, m, 1, ctx, r["tokens_per_s"]))  # fmt: skip
    ratio = res["geode"]["tokens_per_s"] / res["transformers"]["tokens_per_s"]
    emit(bench=name, metric="geode_over_transformers", dtype=str(dtype)[6:], ratio=ratio)
    state[f"geode-{dtype}"] = res["geode"]["tokens_per_s"]
    if "geode-float32" in res:
        state["geode-float32-interleaved"] = res["geode-float32"]["tokens_per_s"]


def part_bf16(args, state) -> None:
    part_b1(args, state, torch.bfloat16, name="bf16")
    emit(bench="bf16", metric="geode_bf16_over_geode_f32",
         ratio=state[f"geode-{torch.bfloat16}"] / state["geode-float32-interleaved"])  # fmt: skip


def part_b16(args, state) -> None:
    model = _nano60m(state)
    ref = hf_model(model, torch.float32, state["tmp"])
    eng = Engine(copy.deepcopy(model), max_batch=16)
    rows = Engine(copy.deepcopy(model), max_batch=16, pack_weights=False)
    res = interleaved(
        {
            "geode": lambda: measure_decode(eng, 16, args.prompt_len, args.new_tokens, reps=1),
            "geode_unpacked": lambda: measure_decode(
                rows, 16, args.prompt_len, args.new_tokens, reps=1
            ),
            "transformers": lambda: hf_decode(ref, 16, args.prompt_len, args.new_tokens, reps=1),
        },
        args.reps,
    )
    ctx = args.prompt_len + args.new_tokens // 2
    for impl, r in res.items():
        emit(bench="b16", impl=impl, model="nano-60m", dtype="float32", batch=16,
             tokens_per_s=r["tokens_per_s"], step_ms=r["step_ms"], prefill_s=r["prefill_s"],
             **_roofline(state, model, 16, ctx, r["tokens_per_s"]))  # fmt: skip
    emit(bench="b16", metric="geode_over_transformers",
         ratio=res["geode"]["tokens_per_s"] / res["transformers"]["tokens_per_s"])  # fmt: skip


def part_kv(args, state) -> None:
    from transformers import DynamicCache, Gemma3TextConfig, StaticCache

    cfg = geode.get_preset("gemma3-4b")
    n = 32_768
    hf_cfg = Gemma3TextConfig(**{k: v for k, v in cfg.to_hf().items()
                                 if k not in ("architectures", "model_type")})  # fmt: skip
    shape = (1, cfg.num_key_value_heads, n, cfg.head_dim)

    def held(cache) -> int:
        return sum(
            t.numel() * t.element_size()
            for layer in cache.layers
            for t in (layer.keys, layer.values)
            if t is not None
        )

    dyn = DynamicCache(config=hf_cfg)
    with torch.device("meta"):
        k = torch.empty(shape, dtype=torch.bfloat16)
        one = torch.empty(shape[:2] + (1, shape[3]), dtype=torch.bfloat16)
        for i in range(cfg.num_hidden_layers):  # a 32K-token prefill, then one decode step
            dyn.update(k, k, i)
        for i in range(cfg.num_hidden_layers):
            dyn.update(one, one, i)
        static = StaticCache(config=hf_cfg, max_cache_len=n + 1)
        for i in range(cfg.num_hidden_layers):
            static.layers[i].lazy_initialization(one, one)
    ours = HybridCache(cfg, 1, n + 1, torch.bfloat16, device="meta").nbytes  # what geode allocates
    full = kv_cache_bytes(cfg, n + 1, torch.bfloat16, ring_buffer=False)
    emit(bench="kv", model="gemma3-4b", tokens=n + 1, dtype="bfloat16",
         geode_bytes=ours, formula_bytes=kv_cache_bytes(cfg, n + 1, torch.bfloat16),
         no_ring_bytes=full,
         transformers_dynamic_bytes=held(dyn), transformers_static_bytes=held(static))  # fmt: skip


def _byte_model(steps: int, seed: int = 0):
    """A small byte-level model trained briefly on tinyshakespeare; returns (model, held ids)."""
    text = SHAKESPEARE.read_bytes() if SHAKESPEARE.is_file() else bytes(range(256)) * 4000
    data = torch.tensor(list(text), dtype=torch.long) + 3  # ids 3..258
    split = int(len(data) * 0.9)
    train, held = data[:split], data[split:]
    cfg = geode.ModelConfig(vocab_size=320, hidden_size=256, intermediate_size=768,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
                            head_dim=64, query_pre_attn_scalar=64, sliding_window=64,
                            max_position_embeddings=512)  # fmt: skip
    model = geode.build_model(cfg, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    T, B = 128, 16
    for step in range(steps):
        idx = torch.randint(0, len(train) - T - 1, (B,), generator=g)
        x = torch.stack([train[i : i + T + 1] for i in idx])
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        for p in opt.param_groups:
            p["lr"] = 2e-3 * min(1.0, (step + 1) / 20)
        opt.step()
    n = (min(len(held), 64 * 257) // 257) * 257
    return model.eval(), held[:n].view(-1, 257)


def _ppl(model, x: torch.Tensor) -> float:
    with torch.inference_mode():
        losses = [
            torch.nn.functional.cross_entropy(
                model(c[:, :-1]).float().flatten(0, 1), c[:, 1:].flatten()
            )  # fmt: skip
            for c in x.split(8)
        ]
    return math.exp(float(torch.stack(losses).mean()))


def part_quant(args, state) -> None:
    variants = [("float32", None, 0), ("int8", "int8", 0), ("int4", "int4", 32),
                ("int4", "int4", 64), ("int4", "int4", 128)]  # fmt: skip
    base = _nano60m(state)
    engines = {}
    for name, mode, g in variants:
        m = copy.deepcopy(base)
        if mode:
            quantize(m, mode, g or 64)
        engines[f"{name}-g{g}" if g else name] = Engine(m, max_batch=1)
    res = interleaved(
        {k: (lambda e=e: measure_decode(e, 1, args.prompt_len, args.new_tokens, reps=1))
         for k, e in engines.items()},
        args.reps,
    )  # fmt: skip
    f32 = res["float32"]["tokens_per_s"]
    small, held = _byte_model(args.train_steps)
    base_ppl = _ppl(small, held)
    for (_, mode, g), (key, r) in zip(variants, res.items(), strict=True):
        ppl = base_ppl
        if mode:
            ppl = _ppl(quantize(copy.deepcopy(small), mode, g or 64), held)
        m = engines[key].model
        emit(bench="quant", variant=key, model="nano-60m", batch=1,
             tokens_per_s=r["tokens_per_s"], speedup_over_f32=r["tokens_per_s"] / f32,
             weight_bytes_per_token=weight_bytes_per_token(m),
             ppl_model=f"bytes-4L-256 trained {args.train_steps} steps",
             ppl=ppl, ppl_change=ppl / base_ppl - 1)  # fmt: skip


def part_prefill(args, state) -> None:
    cfg = geode.get_preset("nano-5m").replace(max_position_embeddings=32_769)
    model = geode.build_model(cfg, seed=0)
    eng = Engine(model, max_batch=1, prefill_chunk=512)
    g = torch.Generator().manual_seed(0)
    prev = None
    for n in (2048, 8192, 32768):
        prompt = torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist()
        times = []
        for _ in range(max(1, args.reps - 1)):
            t = time.perf_counter()
            eng.generate(Request(prompt, temperature=0, max_new_tokens=1))
            times.append(time.perf_counter() - t)
        s = statistics.median(times)
        emit(bench="prefill", model="nano-5m", tokens=n, chunk=512, seconds=s,
             us_per_token=s / n * 1e6, growth_vs_previous=(s / prev if prev else None))  # fmt: skip
        prev = s


def _gemm_times(x, ws, plans, packed, reps: int) -> dict[str, list[float]]:
    """Seconds per call of the kernels (plans: weights read in place, packed: from packed
    copies) and of torch's F.linear (ws), interleaved."""
    from geode.infer import kernels

    xt = x.to(ws[0].dtype)

    def per_call(fn, items) -> float:
        t = time.perf_counter()
        for item in items:
            fn(item)
        return (time.perf_counter() - t) / len(items)

    def ours(p):
        return kernels.gemv(x, p)

    def ref(w):
        return torch.nn.functional.linear(xt, w)

    per_call(ours, plans), per_call(ours, packed), per_call(ref, ws)  # warm-up
    times: dict[str, list[float]] = {"geode": [], "geode_rows": [], "torch": []}
    for _ in range(reps):
        # torch's OpenMP workers spin after their regions and would take the cores the kernels'
        # pool needs (which then runs alone for 0.25 s): let them go idle first
        time.sleep(0.3)
        times["geode"].append(per_call(ours, packed))
        times["geode_rows"].append(per_call(ours, plans))
        times["torch"].append(per_call(ref, ws))
    return times


def part_gemm(args, state) -> None:
    from geode.infer import kernels

    cfg = geode.get_preset("nano-60m")
    h, inter, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {"qkv": ((cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * D, h),
              "o": (h, cfg.num_attention_heads * D), "gate_up": (2 * inter, h),
              "down": (h, inter), "head": (cfg.vocab_size, h)}  # fmt: skip
    M = 16
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for name, (N, K) in shapes.items():
            # several copies, more bytes than the L3 cache: weights stream from memory per call
            copies = max(1, (64 << 20) // (N * K * 4))
            ws = [(torch.randn(N, K, generator=g) * 0.05).to(dtype) for _ in range(copies)]
            kind = "f32" if dtype == torch.float32 else "bf16"
            specs = [kernels.WeightSpec(kind, w if kind == "f32" else w.view(torch.int16))
                     for w in ws]  # fmt: skip
            plans = [kernels.GemvPlan([s]) for s in specs]
            packed = [kernels.GemvPlan([s], packed=True) for s in specs]
            x = torch.randn(M, K, generator=g)
            times = _gemm_times(x, ws, plans, packed, max(5, 3 * args.reps))
            flop = 2 * M * N * K
            gf = {k: flop / statistics.median(v) / 1e9 for k, v in times.items()}
            emit(bench="gemm", shape=name, M=M, N=N, K=K, dtype=str(dtype)[6:],
                 geode_gflops=gf["geode"], geode_rows_gflops=gf["geode_rows"],
                 torch_gflops=gf["torch"], ratio=gf["geode"] / gf["torch"])  # fmt: skip


PARTS = {"bandwidth": part_bandwidth, "b1": part_b1, "bf16": part_bf16, "b16": part_b16,
         "kv": part_kv, "quant": part_quant, "prefill": part_prefill,
         "gemm": part_gemm}  # fmt: skip


def table() -> None:
    """Readable summary of ROWS."""
    print("\n| bench | what | value |\n| --- | --- | --- |")
    for r in ROWS:
        b = r["bench"]
        if b == "bandwidth":
            print(f"| bandwidth | copy ({r['threads']} threads) | {r['copy_gb_s']:.1f} GB/s |")
        elif b == "gemm":
            print(f"| gemm | M=16 {r['shape']} {r['N']}x{r['K']} {r['dtype']}: geode packed / "
                  f"rows / torch | {r['geode_gflops']:.0f} / {r['geode_rows_gflops']:.0f} / "
                  f"{r['torch_gflops']:.0f} GFLOP/s ({r['ratio']:.2f}x) |")  # fmt: skip
        elif "metric" in r:
            print(f"| {b} | {r['metric']} | {r['ratio']:.2f}x |")
        elif b in ("b1", "bf16", "b16"):
            print(f"| {b} | {r['impl']} {r['dtype']} batch {r['batch']} | "
                  f"{r['tokens_per_s']:.1f} tok/s ({r['roofline_fraction']:.0%} of roofline "
                  f"{r['roofline_tokens_per_s']:.0f}) |")  # fmt: skip
        elif b == "kv":
            gib = 2**30
            print(f"| kv | gemma3-4b bf16 {r['tokens']} tokens: geode = formula / no ring / "
                  f"transformers dynamic / static | {r['geode_bytes'] / gib:.3f} / "
                  f"{r['no_ring_bytes'] / gib:.3f} / {r['transformers_dynamic_bytes'] / gib:.3f}"
                  f" / {r['transformers_static_bytes'] / gib:.3f} GiB |")  # fmt: skip
        elif b == "quant":
            print(f"| quant | {r['variant']} | {r['tokens_per_s']:.1f} tok/s "
                  f"({r['speedup_over_f32']:.2f}x f32), ppl {r['ppl']:.3f} "
                  f"({r['ppl_change']:+.2%}) |")  # fmt: skip
        elif b == "prefill":
            grow = (
                f", x{r['growth_vs_previous']:.2f} vs previous" if r["growth_vs_previous"] else ""
            )
            print(f"| prefill | nano-5m {r['tokens']} tokens | {r['seconds']:.2f} s "
                  f"({r['us_per_token']:.0f} us/token{grow}) |")  # fmt: skip


def main() -> None:
    """Run the selected parts."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=300, help="steps of the byte-level model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {args.threads} threads, kernels: "
          f"{'on' if kernels.available() else kernels.load_error()}")  # fmt: skip
    state: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        state["tmp"] = Path(tmp)
        for name in args.parts.split(","):
            PARTS[name](args, state)
    table()


if __name__ == "__main__":
    main()
