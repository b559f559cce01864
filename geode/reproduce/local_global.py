"""`geode reproduce local-global`: Gemma 3's 5:1 local/global attention against all-global.

Gemma 3 Technical Report (arXiv:2503.19786) §2 ("5 local layers for every global layer",
local span 1024) and its ablations (§5, "Local:Global ratio", "Sliding window size",
"Impact on KV cache memory"): the interleaving barely changes perplexity while the KV cache of
long contexts shrinks, since a local layer keeps only its window. Here two models of the same
size (6 layers, every parameter shared in shape) train on the same tokens with the same seed,
one 5:1 local/global, one all-global; their held-out loss difference comes with a noise
estimate (a second seed, and a paired bootstrap over held-out windows), and the KV-cache bytes
of one sequence of n tokens follow the formula

    bytes(n) = 2 * H_kv * D * b * (L_global * n + L_local * min(n, W))

(keys and values, H_kv heads of D elements of b bytes, W the window), checked against geode's
cache accounting (`kv_cache_bytes` and an allocated `HybridCache`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import Setup, corpus, heldout_curve, lm_recipe, md_table, step_count, write_report

CLAIM = ("Interleaving 5 local (sliding-window) layers per global layer (Gemma 3) costs "
         "little held-out loss against an all-global model of the same size trained on the "
         "same tokens, while the KV cache of long contexts shrinks by a large factor.")  # fmt: skip
WINDOW = 32  # the nano models' local span: a quarter of the training sequence (128)
CONTEXTS = (128, 1024, 4096, 32_768, 131_072)
BOOTSTRAP = 2000
TOLERANCE = 0.01  # "little": under 1% of the all-global loss, or within 2x the noise


def kv_bytes(n: int, global_layers: int, local_layers: int, kv_heads: int, head_dim: int,
             window: int, bytes_per: int = 2) -> int:  # fmt: skip
    """KV-cache bytes of one sequence of n tokens (the module docstring's formula)."""
    return 2 * kv_heads * head_dim * bytes_per * (global_layers * n + local_layers * min(n, window))


def config_kv_bytes(config: Any, n: int, bytes_per: int = 2) -> int:
    """`kv_bytes` for a uniform-head ModelConfig (its layer_types counted)."""
    local = sum(t == "sliding_attention" for t in config.layer_types)
    return kv_bytes(n, len(config.layer_types) - local, local, config.num_key_value_heads,
                    config.head_dim, config.sliding_window, bytes_per)  # fmt: skip


def cache_check(config: Any, n: int) -> dict[str, Any]:
    """The formula against geode's accounting for one length: kv_cache_bytes and the bytes an
    allocated one-row HybridCache of capacity n holds (bfloat16)."""
    import torch

    from ..infer import HybridCache, kv_cache_bytes

    cache = HybridCache(config, 1, n, dtype=torch.bfloat16)
    got = {"n": n, "formula": config_kv_bytes(config, n),
           "kv_cache_bytes": kv_cache_bytes(config, n, torch.bfloat16),
           "hybrid_cache_nbytes": cache.nbytes}  # fmt: skip
    got["equal"] = got["formula"] == got["kv_cache_bytes"] == got["hybrid_cache_nbytes"]
    return got


def _shapes(setup: Setup) -> dict[str, dict[str, Any]]:
    """Model overrides of the two arms: same size, 5:1 local/global or all global."""
    from .. import quickstart as q

    hidden, _, heads, head_dim = q.SHAPES[0] if setup.tiny else q.SHAPES[1]
    base = {**q._shape(hidden, 6, heads, head_dim), "sliding_window": WINDOW}
    return {"local_global": base,
            "all_global": {**base, "layer_types": ["full_attention"] * 6}}  # fmt: skip


def run(setup: Setup) -> dict[str, Any]:
    """Both arms on the same tokens (one or two seeds), held-out losses, KV bytes; the report."""
    import dataclasses

    from .. import quickstart as q
    from ..config import get_preset
    from ..train.recipe import load_train_recipe
    from ..train.run import train

    setup.stage(1, 4, "corpus (task family + stdlib), tokenizer, packing")
    ctx = corpus(setup)
    vocab = ctx.done["tokenizer"]["vocab_size"]
    shapes = _shapes(setup)
    seeds = [setup.seed] if setup.tiny else [setup.seed, setup.seed + 1]
    runs = len(seeds) * len(shapes)
    steps = (
        4 if setup.tiny else step_count(setup, 0.95, shapes["all_global"], vocab, runs=runs, lo=20)
    )

    setup.stage(2, 4, f"{runs} runs (2 arms x {len(seeds)} seed(s)), {steps} steps each")
    models: dict[tuple[str, int], str] = {}
    for seed in seeds:
        for arm, shape in shapes.items():
            d = setup.out / f"{arm}-seed{seed}"
            r = lm_recipe(ctx, setup, f"{arm}-seed{seed}", shape, steps, d, seed=seed)
            models[arm, seed] = train(load_train_recipe(r), d, progress=setup.progress)["model"]

    setup.stage(3, 4, "held-out losses per window, paired bootstrap; KV-cache bytes")
    heldout = ctx.dir("pretrain") / "data" / "heldout"
    per_seed = []
    for seed in seeds:
        lg = window_losses(models["local_global", seed], heldout)
        ag = window_losses(models["all_global", seed], heldout)
        lo, hi = paired_bootstrap(lg, ag, seed)
        a, b = _mean(lg), _mean(ag)
        per_seed.append({"seed": seed, "local_global": a, "all_global": b, "difference": a - b,
                         "ci95": [lo, hi], "windows": len(lg[0])})  # fmt: skip
    diff = sum(r["difference"] for r in per_seed) / len(per_seed)
    half = max((r["ci95"][1] - r["ci95"][0]) / 2 for r in per_seed)
    spread = (abs(per_seed[0]["difference"] - per_seed[1]["difference"])
              if len(per_seed) > 1 else None)  # fmt: skip
    noise = max(half, spread or 0.0)
    base_loss = sum(r["all_global"] for r in per_seed) / len(per_seed)

    from ..checkpoint import read_config

    nano = {arm: read_config(models[arm, seeds[0]]) for arm in shapes}
    big = get_preset("gemma3-27b")
    big_global = dataclasses.replace(big, layer_types=("full_attention",) * len(big.layer_types))
    configs = {"nano 5:1": nano["local_global"], "nano all-global": nano["all_global"],
               "gemma3-27b 5:1": big, "gemma3-27b all-global": big_global}  # fmt: skip
    kv = {name: {str(n): config_kv_bytes(c, n) for n in CONTEXTS} for name, c in configs.items()}
    check = [cache_check(nano[arm], 4 * WINDOW) for arm in shapes]

    setup.stage(4, 4, "report")
    plot = _plot(kv, setup.out / "kv_cache_bytes.png")
    curves = {f"{arm} seed {seed}": heldout_curve(setup.out / f"{arm}-seed{seed}")
              for seed in seeds for arm in shapes}  # fmt: skip
    loss_plot = _plot_losses(curves, setup.out / "heldout_loss.png")
    small = diff <= max(2 * noise, TOLERANCE * base_loss)
    saving = kv["gemma3-27b all-global"]["32768"] / kv["gemma3-27b 5:1"]["32768"]
    nano_saving = kv["nano all-global"]["32768"] / kv["nano 5:1"]["32768"]
    holds = small and saving > 1 and all(c["equal"] for c in check)
    loss_table = md_table(
        ["seed", "5:1 local/global", "all-global", "difference (local - global)", "95% CI (paired bootstrap)", "held-out windows"],
        [[r["seed"], r["local_global"], r["all_global"], r["difference"],
          f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]", r["windows"]] for r in per_seed],
    )  # fmt: skip
    kv_table = md_table(["model", *[f"n = {n:,}" for n in CONTEXTS]],
                        [[name, *[_human(v[str(n)]) for n in CONTEXTS]] for name, v in kv.items()])  # fmt: skip
    check_table = md_table(["arm", "n", "formula", "kv_cache_bytes", "HybridCache.nbytes", "equal"],
                           [[arm, c["n"], c["formula"], c["kv_cache_bytes"],
                             c["hybrid_cache_nbytes"], c["equal"]] for arm, c in zip(shapes, check)])  # fmt: skip
    tables = (f"Held-out loss (nats/token, token-weighted over every held-out window):\n\n"
              f"{loss_table}\n\nMean difference {diff:+.4f}; noise {noise:.4f} (the larger of "
              f"the bootstrap 95% half-width and the seed-to-seed spread"
              f"{'' if spread is not None else ', one seed at this budget'}).\n\n"
              f"KV-cache bytes of one sequence (bfloat16), by the formula:\n\n{kv_table}\n\n"
              f"Formula against geode's cache accounting (bfloat16, n = {4 * WINDOW}):\n\n"
              f"{check_table}")  # fmt: skip
    if abs(diff) <= 2 * noise:
        size = "within the noise"
    elif diff < 0:
        size = "the 5:1 model is better, beyond the noise (the local layers cost nothing here)"
    elif small:
        size = f"beyond the noise but under {TOLERANCE:.0%} of the loss: measurable and small"
    else:
        size = (f"beyond the noise and over {TOLERANCE:.0%} of the loss: at this scale the local "
                f"layers' shorter span (window {WINDOW} of {q.SEQ_LEN} training tokens) costs "
                "measurable loss")  # fmt: skip
    verdict = (f"The 5:1 model's held-out loss differs from all-global by {diff:+.4f} nats/token "
               f"({100 * diff / base_loss:+.2f}%), noise {noise:.4f}: {size}. At 32K tokens the "
               f"KV cache is {saving:.1f}x smaller for Gemma 3 27B's shape (window 1024) and "
               f"{nano_saving:.1f}x for the nano pair (window {WINDOW}).")  # fmt: skip
    h, L = shapes["local_global"]["hidden_size"], 6
    setup_text = (f"Two nano Gemma 3 models, hidden {h}, {L} layers, 1 KV head, window {WINDOW}, "
                  f"sequence 128: 5 sliding + 1 global layer vs 6 global layers (same parameter "
                  f"count), each trained {steps} steps on the same tokens, seed(s) {seeds}. "
                  "Held-out: the task family's held-out split, every window; noise: a paired "
                  f"bootstrap ({BOOTSTRAP} resamples of windows)"
                  f"{' and a second seed' if len(seeds) > 1 else ''}.")  # fmt: skip
    results = {"steps": steps, "seeds": seeds, "window": WINDOW, "per_seed": per_seed,
               "difference": diff, "noise": noise, "seed_spread": spread,
               "relative_difference": diff / base_loss, "kv_cache_bytes": kv,
               "kv_saving_32k": {"gemma3-27b": saving, "nano": nano_saving},
               "cache_check": check,
               "curves": {k: {str(s): v for s, v in c.items()} for k, c in curves.items()}}  # fmt: skip
    return write_report(setup, "5:1 local/global attention vs all-global", CLAIM, setup_text,
                        tables, verdict, holds, [loss_plot, plot], results)  # fmt: skip


def window_losses(model_dir: str | Path, data: Path) -> tuple[list[float], list[float]]:
    """(loss sum, target count) per held-out window of the packed stream `heldout` (segment-
    masked next-token loss, as training computes it)."""
    import numpy as np
    import torch

    from ..checkpoint import load_model
    from ..data.loader import Batch, Windows
    from ..data.pack import open_dataset
    from ..quickstart import SEQ_LEN
    from ..train.objectives.base import token_logprobs

    model = load_model(model_dir).eval()
    win = Windows(open_dataset(data).streams["heldout"], SEQ_LEN, 0)
    sums: list[float] = []
    counts: list[float] = []
    with torch.no_grad():
        for start in range(0, win.num_windows, 32):
            ids = list(range(start, min(start + 32, win.num_windows)))
            tok, pos, seg = (torch.from_numpy(np.stack(x)) for x in zip(*map(win.window, ids)))
            b = Batch(tok, pos, seg, torch.zeros(len(ids)), torch.tensor(ids))  # rows (B, T+1)
            lp = token_logprobs(model(**b.model_inputs()), b.targets)  # (B, T)
            mask = b.loss_mask.float()  # (B, T)
            sums += (-(lp * mask).sum(1)).tolist()
            counts += mask.sum(1).tolist()
    return sums, counts


def _mean(lc: tuple[list[float], list[float]]) -> float:
    return sum(lc[0]) / max(sum(lc[1]), 1.0)


def paired_bootstrap(a: tuple[list[float], list[float]], b: tuple[list[float], list[float]],
                     seed: int) -> tuple[float, float]:  # fmt: skip
    """95% interval of mean loss(a) - mean loss(b), resampling held-out windows (paired)."""
    import numpy as np

    sa, ca, sb, cb = (np.asarray(x, dtype=np.float64) for x in (*a, *b))  # (N,) each
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(sa), size=(BOOTSTRAP, len(sa)))  # (R, N)
    d = sa[idx].sum(1) / ca[idx].sum(1).clip(1) - sb[idx].sum(1) / cb[idx].sum(1).clip(1)
    lo, hi = np.quantile(d, [0.025, 0.975])
    return float(lo), float(hi)


def _human(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _plot(kv: dict[str, dict[str, int]], path: Path) -> Path:
    """KV-cache bytes against context length, log-log, both arms of both shapes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..fileio import save_figure

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, v in kv.items():
        ax.plot(CONTEXTS, [v[str(n)] for n in CONTEXTS], "o-" if "5:1" in name else "s--",
                label=name)  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("KV-cache bytes per sequence (bfloat16)")
    ax.set_title("KV cache: 5:1 local/global vs all-global")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _plot_losses(curves: dict[str, dict[int, float]], path: Path) -> Path:
    """Held-out loss against steps of every run (both arms, every seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..fileio import save_figure

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, c in curves.items():
        ax.plot(list(c), list(c.values()), "o-" if name.startswith("local") else "s--", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("5:1 local/global vs all-global, same tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
