"""Benchmark: speculative decoding at batch 1, greedy — geode vs transformers' assisted generation.

Target: a checkpoint (default the real Gemma 3 270M that bench/real.py prepares in
~/.cache/geode-bench/gemma3-270m/hf-f32). Draft: --draft DIR, or one distilled here with the
trainer's distillation (`geode.train.train_distilled`: Gemma 3's sampled top-K teacher targets)
into a small student with the target's tokenizer, on --corpus text, cached in
~/.cache/geode-bench/spec-draft-<key>/ (data, run, model).
Rows, each the median of --reps after a warm-up, the same prompts for every implementation:
  geode         plain greedy / --draft model (k = --k, adaptive) / n-gram prompt lookup
  transformers  generate / generate(assistant_model=the same draft) / generate(prompt_lookup_num_tokens)
Every speculative row's tokens are checked equal to its plain row's (geode and transformers
each against themselves; geode plain against transformers plain is reported too). The n-gram
rows use a repetitive prompt (a passage quoted back); the model rows a corpus passage.

usage: python bench/speculative.py [--target DIR] [--draft DIR] [--new-tokens 64] [--reps 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from geode.infer import Engine, Request
from geode.infer.load import load_for_inference

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "geode-bench"
ROWS: list[dict] = []

# A small student with the target's vocabulary (the embedding is most of it).
STUDENT = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    query_pre_attn_scalar=32,
    sliding_window=512,
    max_position_embeddings=2048,
)

# Distillation settings: the 270M teacher's forward (262k-column head) dominates each step.
DISTILL = dict(seq_len=64, batch=4, top_k=32)


def emit(**row) -> None:
    """Record a measurement and print it as a JSON line."""
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def make_draft(target: Path, corpus: Path, steps: int, threads: int) -> Path:
    """Distil a STUDENT-shaped draft from `target` on `corpus` (cached); its model directory."""
    from geode.data.prepare import load_data_recipe, prepare
    from geode.train import load_train_recipe, train_distilled

    key = hashlib.sha256(json.dumps([str(target), str(corpus)]).encode()).hexdigest()[:10]
    data = CACHE / f"spec-data-{key}"  # the corpus tokenized with the target's tokenizer
    key = hashlib.sha256(json.dumps([key, steps, STUDENT, DISTILL]).encode()).hexdigest()[:10]
    work = CACHE / f"spec-draft-{key}"
    model = work / "run" / "student" / "model"
    if (model / "config.json").is_file():
        return model
    work.mkdir(parents=True, exist_ok=True)
    if not (data / "data").is_dir():
        data.mkdir(parents=True, exist_ok=True)
        lines = corpus.read_text().splitlines()
        (data / "train.txt").write_text("\n".join(lines[: len(lines) * 9 // 10]) + "\n")
        (data / "heldout.txt").write_text("\n".join(lines[len(lines) * 9 // 10 :]) + "\n")
        (data / "data.toml").write_text(
            f'tokenizer = "{target}"\nout = "{data / "data"}"\n[filters]\nmin_chars = 1\n'
            "[dedup]\nexact = false\nnear = false\n"
            f'[[sources]]\nname = "train"\nkind = "text"\npaths = ["{data / "train.txt"}"]\n'
            'split_by = "paragraph"\n'
            f'[[sources]]\nname = "heldout"\nkind = "text"\npaths = ["{data / "heldout.txt"}"]\n'
            'split_by = "paragraph"\n'
        )
        prepare(load_data_recipe(data / "data.toml"), progress=False)
    overrides = ", ".join(f"{k} = {v}" for k, v in STUDENT.items())
    (work / "distill.toml").write_text(
        f'name = "spec-draft"\nout = "{work / "run"}"\n'
        f'[model]\npreset = "nano-1m"\noverrides = {{ vocab_size = 262144, {overrides} }}\n'
        f'[data]\npath = "{data / "data"}"\nseq_len = {DISTILL["seq_len"]}\n'
        'eval_source = "heldout"\n'
        f"[batch]\nglobal_batch_size = {DISTILL['batch']}\n"
        f"[optim]\nlr = 4e-3\nwarmup_steps = {min(10, steps // 4)}\n"
        f"[train]\nmax_steps = {steps}\nthreads = {threads}\nprogress = false\nlog_every = 10\n"
        "[eval]\nevery = 0\nbatches = 2\n[checkpoint]\nevery = 0\n"
        f'[distill]\nteacher = "{target}"\ntop_k = {DISTILL["top_k"]}\ncontrol = false\n'
    )
    train_distilled(load_train_recipe(work / "distill.toml"), progress=False, control=False)
    return model


def timed(fn, reps: int) -> tuple[float, object]:
    """Median seconds of fn() over reps runs after one warm-up; its last output."""
    out = fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def geode_run(engine: Engine, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of one request (exactly n: ignore_eos)."""
    req = Request(prompt, max_new_tokens=n, temperature=0, ignore_eos=True)
    return engine.generate([req])[0].token_ids


def hf_run(model, prompt: list[int], n: int, **kw) -> list[int]:
    """transformers generate, greedy, exactly n new tokens."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, **kw
        )
    return out[0, len(prompt) :].tolist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", type=Path, default=CACHE / "gemma3-270m" / "hf-f32")
    ap.add_argument("--draft", type=Path, help="draft checkpoint (default: distil one)")
    ap.add_argument("--corpus", type=Path,
                    default=ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt")  # fmt: skip
    ap.add_argument("--distill-steps", type=int, default=60)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4, help="draft tokens per step (geode's k_max)")
    ap.add_argument("--ngram", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-reference", action="store_true", help="geode rows only")
    ap.add_argument("--int4-self-draft", action="store_true",
                    help="also: the target's weights quantized to int4 as the draft")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.target / "config.json").is_file():
        sys.exit(f"{args.target}: no checkpoint (python bench/real.py prepares the Gemma 3 270M)")
    draft_dir = args.draft or make_draft(args.target, args.corpus, args.distill_steps, args.threads)
    target, tok = load_for_inference(args.target, "float32")
    draft, _ = load_for_inference(draft_dir, "float32")
    text = args.corpus.read_text()
    passage = text[20000:20600]
    prompts = {
        "model": tok.encode(passage, add_bos=True),
        "int4": tok.encode(passage, add_bos=True),
        # quoting a passage back: the continuation repeats what the prompt holds
        "ngram": tok.encode(
            "Repeat the passage exactly.\n\n"
            + passage
            + "\n\nThe passage again:\n\n"
            + passage[:200],
            add_bos=True,
        ),  # fmt: skip
    }
    n = args.new_tokens
    base = Engine(target, tok, max_batch=1)
    spec = {
        "model": Engine(target, tok, max_batch=1, draft=draft, num_draft_tokens=args.k),
        "ngram": Engine(
            target, tok, max_batch=1, draft=f"ngram:{args.ngram}", num_draft_tokens=args.k
        ),
    }
    if args.int4_self_draft:  # the target's own weights in int4 (geode only: no HF loader)
        from geode.infer.quant import quantize

        q4, _ = load_for_inference(args.target, "float32")
        quantize(q4, "int4", 64)
        spec["int4"] = Engine(target, tok, max_batch=1, draft=q4, num_draft_tokens=args.k)
    else:
        del prompts["int4"]
    hf = hf_draft = None
    if not args.skip_reference:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
        hf_draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
    for kind, prompt in prompts.items():
        # decode rate = (n - 1) / (t(n) - t(1)): the prompt's prefill, the same with or without
        # a draft, is taken out (drafting and the draft's own prefill stay in)
        eng = spec[kind]
        t1, _ = timed(lambda p=prompt: geode_run(base, p, 1), 1)
        t_plain, plain = timed(lambda p=prompt: geode_run(base, p, n), args.reps)
        before = dict(eng.stats)
        t_spec, got = timed(lambda p=prompt, e=eng: geode_run(e, p, n), args.reps)
        drafted = eng.stats.get("draft_tokens", 0) - before.get("draft_tokens", 0)
        accepted = eng.stats.get("accepted_tokens", 0) - before.get("accepted_tokens", 0)
        r_plain, r_spec = (n - 1) / (t_plain - t1), (n - 1) / (t_spec - t1)
        emit(impl="geode", draft=kind, prompt_tokens=len(prompt), new_tokens=n,
             plain_tok_s=r_plain, spec_tok_s=r_spec, speedup=r_spec / r_plain,
             acceptance=accepted / max(1, drafted), identical=got == plain)  # fmt: skip
        if hf is None or kind == "int4":
            continue
        kw = {"assistant_model": hf_draft} if kind == "model" else {
            "prompt_lookup_num_tokens": args.k, "max_matching_ngram_size": args.ngram}  # fmt: skip
        t1, _ = timed(lambda p=prompt: hf_run(hf, p, 1), 1)
        t_hf, hf_plain = timed(lambda p=prompt: hf_run(hf, p, n), args.reps)
        t_hf_spec, hf_got = timed(lambda p=prompt, kw=kw: hf_run(hf, p, n, **kw), args.reps)
        r_plain, r_spec = (n - 1) / (t_hf - t1), (n - 1) / (t_hf_spec - t1)
        emit(impl="transformers", draft=kind, prompt_tokens=len(prompt), new_tokens=n,
             plain_tok_s=r_plain, spec_tok_s=r_spec, speedup=r_spec / r_plain,
             identical=hf_got == hf_plain, same_as_geode=hf_plain == plain)  # fmt: skip
    print(f"\ntarget {args.target}  draft {draft_dir}  batch 1  greedy  {n} new tokens  "
          f"threads {args.threads}  k {args.k}  (decode tok/s: prefill taken out)")  # fmt: skip
    print(f"{'impl':<13} {'draft':<6} {'plain tok/s':>11} {'spec tok/s':>10} {'speed-up':>8} "
          f"{'accept':>7} {'identical':>9}")  # fmt: skip
    for r in ROWS:
        acc = f"{r['acceptance']:.0%}" if "acceptance" in r else "-"
        print(f"{r['impl']:<13} {r['draft']:<6} {r['plain_tok_s']:>11.1f} {r['spec_tok_s']:>10.1f} "
              f"{r['speedup']:>7.2f}x {acc:>7} {str(r['identical']):>9}")  # fmt: skip
    geo = {r["draft"]: r for r in ROWS if r["impl"] == "geode"}
    ref = {r["draft"]: r for r in ROWS if r["impl"] == "transformers"}
    for kind in geo:
        if kind in ref:
            print(
                f"geode {kind} draft vs transformers: {geo[kind]['spec_tok_s'] / ref[kind]['spec_tok_s']:.2f}x"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
