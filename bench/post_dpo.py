"""DPO throughput: geode's trainer (the `dpo` objective) vs TRL's DPOTrainer, same model, same
pairs, same run (bench/post.py's "dpo" row; `python bench/post_dpo.py` runs it alone).

Both sides train the same random nano checkpoint on the same token-id pairs (prompt + chosen /
rejected of random tokens), AdamW, clip 1.0, no weight decay, the reference = the initial
model scored on the fly by TRL and from geode's precomputed on-disk cache (each side as it
runs by default; TRL also with `precompute_ref_log_probs`). TRL receives the ids directly
(its text preparation is bypassed; a word-level stand-in tokenizer supplies the pad id).
TRL runs in bf16 autocast with and without gradient checkpointing and in fp32; geode in fp32
and bf16 autocast. The sides alternate step by step (TRL's step callback runs one geode step of
each configuration). Tokens/s counts prompt + response tokens of both rows of every pair.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import geode  # noqa: E402
from geode.post.pairs import EncodedPair, pairs_batch  # noqa: E402
from geode.train.batches import TrainData  # noqa: E402
from geode.train.loop import Trainer  # noqa: E402

TRL_CONFIGS = {"trl:bf16+gc": (True, True), "trl:bf16": (True, False), "trl:fp32": (False, False)}


def make_pairs(args, vocab: int) -> list[EncodedPair]:
    """`batch` pairs: prompt of seq/2 random ids, responses of seq/2 (chosen) and seq/2 - 8."""
    g = torch.Generator().manual_seed(0)
    half = args.seq // 2

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(3, vocab, (n,), generator=g).tolist())

    return [EncodedPair((2, *ids(half - 1)), ids(half), ids(half - 8)) for _ in range(args.batch)]


def geode_step(args, init: Path, pairs, out: Path, precision: str, compile: bool = False):
    """One geode DPO step per call on the same pairs (reference cached once, before timing)."""
    from geode.post.recipe import load_post_recipe

    recipe = load_post_recipe({
        "name": "bench-dpo", "out": str(out), "model": {"init": str(init)},
        "data": {"path": "bench-pairs", "seq_len": args.seq},
        "objective": {"kind": "dpo", "options": {"beta": 0.1}},
        "batch": {"global_batch_size": 2 * args.batch},
        "optim": {"lr": 1e-6, "warmup_steps": 0, "grad_clip": 1.0, "weight_decay": 0.0},
        "train": {"max_steps": 10**6, "progress": False, "threads": args.threads,
                  "precision": precision, "compile": compile},
        "checkpoint": {"export": False},
    })  # fmt: skip
    batch = pairs_batch(pairs, 0)

    def forever():
        while True:
            yield batch

    trainer = Trainer(recipe, out=out, data=TrainData(batches=forever, vocab_size=0))
    trainer.objective.reference.sequence_logprobs(batch)  # the cache, computed once
    return trainer.train_step


def trl_run(args, init: Path, pairs, bf16: bool, gc: bool, steps: int, out: Path, between,
            times: list[float]) -> None:  # fmt: skip
    """TRL DPOTrainer for `steps` steps on the same pairs; step times appended to `times`."""
    from datasets import Dataset
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import Gemma3ForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, *a, **k):
            return dataset

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<pad>": 0, "<eos>": 1, "<bos>": 2}, unk_token="<pad>")),
        pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
    )  # fmt: skip
    data = {
        "prompt_ids": [list(p.prompt) for p in pairs] * steps,
        "chosen_ids": [list(p.chosen) for p in pairs] * steps,
        "rejected_ids": [list(p.rejected) for p in pairs] * steps,
    }
    model = Gemma3ForCausalLM.from_pretrained(init, attn_implementation="sdpa", dtype=torch.float32)
    conf = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=args.batch, max_steps=steps, bf16=bf16,
        gradient_checkpointing=gc, use_cpu=True, learning_rate=1e-6, weight_decay=0.0,
        max_grad_norm=1.0, lr_scheduler_type="constant", logging_steps=10**6, save_strategy="no",
        report_to=[], dataloader_num_workers=0, max_length=None, beta=0.1,
        remove_unused_columns=False, disable_tqdm=True, seed=0,
    )  # fmt: skip

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)
            between()

    PreTokenized(model=model, args=conf, train_dataset=Dataset.from_dict(data),
                 processing_class=tok, callbacks=[Timer()]).train()  # fmt: skip


def bench_dpo(args) -> list[dict]:
    """geode DPO (fp32, bf16 autocast) vs TRL DPOTrainer (its configs), interleaved."""
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="geode-bench-dpo-"))
    cfg = geode.get_preset(args.preset)
    geode.save_model(geode.build_model(cfg, seed=0), tmp / "init")
    pairs = make_pairs(args, cfg.vocab_size)
    tokens = sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
    # bf16 rows only where bf16 matmuls are fast (bench/post.py's probe sets args.bf16_fast)
    bf16_ok = getattr(args, "bf16_fast", True)
    precisions = ("bfloat16", "float32") if bf16_ok else ("float32",)
    impls = {f"geode:{p}": geode_step(args, tmp / "init", pairs, tmp / f"g-{p}", p)
             for p in precisions}  # fmt: skip
    if not getattr(args, "no_compile", False):  # as the SFT rows: train.compile = true
        p = precisions[0]  # the fast precision here
        impls[f"geode:{p}+compile"] = geode_step(args, tmp / "init", pairs, tmp / "g-c", p, True)
    for fn in impls.values():
        for _ in range(args.warmup):
            fn()
    gtimes: dict[str, list[float]] = {k: [] for k in impls}
    ttimes: dict[str, list[float]] = {}
    paired: dict[tuple[str, str], list[float]] = {}
    configs = [c for c in TRL_CONFIGS
               if (not args.trl or c in args.trl) and (bf16_ok or not TRL_CONFIGS[c][0])]  # fmt: skip
    for tname in configs:
        t: list[float] = []

        def between(t=t, tname=tname) -> None:
            for name, fn in impls.items():
                t0 = time.perf_counter()
                fn()
                if len(t) > args.warmup:  # pair TRL's step with the geode step right after it
                    gtimes[name].append(time.perf_counter() - t0)
                    paired.setdefault((tname, name), []).append(t[-1] / gtimes[name][-1])

        bf16, gc = TRL_CONFIGS[tname]
        steps = args.warmup + args.reps
        trl_run(args, tmp / "init", pairs, bf16, gc, steps, tmp / tname, between, t)
        ttimes[tname] = t[args.warmup :]
    rows = []
    for name, ts in {**ttimes, **gtimes}.items():
        med = statistics.median(ts)
        rows.append({"bench": "dpo", "impl": name, "preset": args.preset, "batch": args.batch,
                     "seq": args.seq, "threads": args.threads, "step_s_median": med,
                     "step_s_all": [round(x, 3) for x in ts], "tokens_per_s": tokens / med})  # fmt: skip
    best_t = max((r for r in rows if r["impl"].startswith("trl")), key=lambda r: r["tokens_per_s"])
    best_g = max(
        (r for r in rows if r["impl"].startswith("geode")), key=lambda r: r["tokens_per_s"]
    )
    rows.append({"bench": "dpo", "impl": "ratio", "geode": best_g["impl"], "trl": best_t["impl"],
                 "ratio": best_g["tokens_per_s"] / best_t["tokens_per_s"],
                 "paired_ratio": statistics.median(paired[(best_t["impl"], best_g["impl"])])})  # fmt: skip
    return rows


if __name__ == "__main__":  # the DPO row alone, with bench/post.py's arguments and table
    sys.argv[1:1] = ["--only", "dpo"]
    import post

    post.main()
