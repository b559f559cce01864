"""CFG distillation (geode.post.cfgdistill, objective "cfg_distill"): the guided teacher
against the engine's CFG, the loss against a hand computation, the diversity reward, and a
tiny end-to-end run with its artifacts."""

from __future__ import annotations

import contextlib
import json
import math
from types import SimpleNamespace

import pytest
import torch

from tests.post.conftest import post_recipe

GAMMA = 2.5


@pytest.fixture(scope="module")
def teacher(sft_policy, task_dir):
    """(model, tokenizer, unconditional ids) of the tiny SFT policy."""
    from geode.checkpoint import load_model
    from geode.post.cfgdistill import UNCONDITIONAL, unconditional_ids
    from geode.tokenizer import load_tokenizer

    tok = load_tokenizer(task_dir / "tokenizer.model")
    return load_model(sft_policy).eval(), tok, unconditional_ids(tok, UNCONDITIONAL)


def _prompt_ids(tok, text: str) -> list[int]:
    from geode.post.pairs import prompt_text

    return list(tok.encode(prompt_text([{"role": "user", "content": text}])))


def test_guided_logprobs_equal_the_engines_cfg(teacher, sft_policy):
    """Two teacher passes (cond, uncond) over the engine's own CFG sample give the engine's
    guided log-probs (chosen token and top alternatives) at every step. In float64: in float32
    the engine's incremental forward alone differs from a full forward by ~1e-5 in the tails
    (at γ = 1 too), which the mix amplifies by up to 1 + 2γ."""
    from geode.checkpoint import load_model
    from geode.infer import Engine, Request
    from geode.post.pairs import sequences_batch
    from geode.train.objectives.cfg import teacher_guided_logprobs
    from geode.train.reference import Reference

    _, tok, unc = teacher
    model = load_model(sft_policy, dtype=torch.float64).eval()
    engine = Engine(model, tok, max_batch=8, optimize=False, seed=0)
    prompts = [_prompt_ids(tok, q) for q in ("Mia has 7 apples. She finds 3 more.", "Noah has 4")]
    reqs = [
        Request(p, max_new_tokens=12, temperature=1.0, seed=i, logprobs=3,
                guidance_scale=GAMMA, guidance_prompt=unc)
        for i, p in enumerate(prompts)
    ]  # fmt: skip
    results = engine.generate(reqs)
    batch = sequences_batch([(p, r.token_ids) for p, r in zip(prompts, results)], tok.pad_id)
    got = teacher_guided_logprobs(Reference(model), batch, unc, GAMMA, tok.pad_id)  # (N, V)
    want_chosen, want_top, ids = [], [], []
    for r in results:
        want_chosen += r.logprobs
        want_top += r.top_logprobs
        ids += r.token_ids
    assert got.shape[0] == len(ids) == sum(len(r.token_ids) for r in results) > 12
    chosen = got.gather(1, torch.tensor(ids)[:, None]).squeeze(1)
    torch.testing.assert_close(chosen, torch.tensor(want_chosen), atol=1e-5, rtol=0)
    for row, top in zip(got, want_top):
        for t, lp in top.items():
            assert abs(float(row[t]) - lp) <= 1e-5
    # guidance changes the distribution: the unguided (conditional) log-probs differ
    plain = teacher_guided_logprobs(Reference(model), batch, unc, 1.0, tok.pad_id)
    assert float((plain - got).abs().max()) > 1e-2


def _hand_kl(c: list[float], u: list[float], s: list[float], g: float) -> float:
    """KL(p_cfg || p_s) for one position, in plain Python."""

    def log_softmax(z):
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        return [v - lse for v in z]

    lc, lu, ls = log_softmax(c), log_softmax(u), log_softmax(s)
    lg = log_softmax([b + g * (a - b) for a, b in zip(lc, lu)])
    return sum(math.exp(x) * (x - y) for x, y in zip(lg, ls))


def test_distill_kl_matches_a_hand_computation():
    from geode.train.objectives.cfg import distill_kl, guided_logprobs

    g = torch.Generator().manual_seed(0)
    c, u, s = (torch.randn(6, 7, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    got = distill_kl(guided_logprobs(c, u, GAMMA), s)
    want = [_hand_kl(c[i].tolist(), u[i].tolist(), s[i].tolist(), GAMMA) for i in range(6)]
    torch.testing.assert_close(
        got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=0
    )
    # γ = 1 is the conditional teacher: KL(p_c || p_c) = 0
    assert float(distill_kl(guided_logprobs(c, u, 1.0), c).abs().max()) < 1e-5


def _cfg_recipe(sft_policy, tmp_path, cfg: dict):
    """A cfg_distill recipe from the SFT policy, prompts under tmp_path, with `[cfg]` = cfg."""
    from geode.post.recipe import load_post_recipe

    return load_post_recipe(
        post_recipe(
            tmp_path,
            model={"init": str(sft_policy)},
            data={"path": str(tmp_path / "prompts.jsonl"), "seq_len": 128},
            objective={"kind": "cfg_distill"},
            cfg=cfg,
        )
    )


def _objective(model, sft_policy, task_dir, tmp_path, beta: float):
    from geode.train.objectives.cfg import CfgDistill

    recipe = _cfg_recipe(sft_policy, tmp_path, {"guidance_scale": GAMMA, "diversity_weight": beta})
    trainer = SimpleNamespace(
        recipe=recipe, config=model.config, raw_model=model, autocast_dtype=None,
        info=SimpleNamespace(device=torch.device("cpu")), _autocast=contextlib.nullcontext,
    )  # fmt: skip
    return CfgDistill(trainer)


def test_objective_loss_matches_a_hand_computation(teacher, sft_policy, task_dir, tmp_path):
    """loss_sum = sum of per-token KL to the guided teacher (each row's conditional and
    unconditional passes run alone, unpadded) + β sum_t -A_i; normalizer = completion tokens."""
    from geode.post.pairs import sequences_batch

    model, tok, unc = teacher
    prompts = [_prompt_ids(tok, "Ava has 5 cards."), _prompt_ids(tok, "Omar has 12 eggs. He")]
    comps = [tok.encode(" She finds 2 more."), tok.encode(" loses 3 eggs.")]
    batch = sequences_batch(list(zip(prompts, comps)), tok.pad_id)
    batch.advantages = torch.tensor([0.7, -0.3])
    obj = _objective(model, sft_policy, task_dir, tmp_path, beta=0.5)
    total, n, metrics = obj.loss_sum(model, batch)
    want = 0.0
    with torch.no_grad():
        for p, c, a in zip(prompts, comps, batch.advantages.tolist()):
            lc = model(torch.tensor([p + c]))[0, len(p) - 1 : -1].double()  # (n, V)
            lu = model(torch.tensor([unc + c]))[0, len(unc) - 1 : -1].double()
            for k in range(len(c)):  # the student is the teacher here (same weights)
                want += _hand_kl(lc[k].tolist(), lu[k].tolist(), lc[k].tolist(), GAMMA)
                want += 0.5 * -a
    assert n == sum(map(len, comps))
    assert abs(float(total.detach()) - want) <= 1e-4 * max(1.0, abs(want))
    assert float(metrics["kl"]) > 0  # the student is not yet the guided teacher
    # the gradient of the PG term is -β A ∇ log p: with A = 0 only the KL remains
    batch.advantages = torch.zeros(2)
    total0, _, _ = obj.loss_sum(model, batch)
    assert abs(float(total0.detach()) - float(metrics["kl"])) <= 1e-5


def test_diversity_reward_identical_vs_different(sft_policy, task_dir):
    """Identical samples of one prompt score 0; different ones > 0; a lone sample 0."""
    from geode.post.cfgdistill import diversity_scores
    from geode.post.rewards import Sample, build_rewards
    from geode.tokenizer import load_tokenizer

    rewards = build_rewards(
        [{"kind": "diversity", "options": {"embedder": str(sft_policy)}}],
        tokenizer=load_tokenizer(task_dir / "tokenizer.model"),
    )
    texts = ["Mia has 5 apples.", "Mia has 5 apples.", "Mia has 5 apples.",
             "Noah loses 12 coins.", "#### 7", "Zara buys 3 jars of beads.", "alone"]  # fmt: skip
    groups = [0, 0, 0, 1, 1, 1, 2]
    scored = rewards([Sample(prompt=[], completion=t, group=g) for t, g in zip(texts, groups)])
    r = scored.rewards.tolist()
    assert not scored.failed.any()
    assert max(abs(v) for v in r[:3]) < 1e-5
    assert min(r[3:6]) > 0.01
    assert r[6] == 0.0
    # the closed form: orthogonal embeddings have diversity 1, opposite ones 2
    e = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, -1.0]])
    assert diversity_scores(e, [0, 0, 1, 1]) == pytest.approx([1.0, 1.0, 2.0, 2.0])


def test_cfg_distill_end_to_end(sft_policy, task_dir, tmp_path):
    """Quality model, diversity model and the front: files written; the front's endpoints
    are the two models (t = 0 / 1 measured on the same samples' seeds)."""
    from geode.post.cfgdistill import cfg_distill
    from geode.post.recipe import load_post_recipe

    recipe = load_post_recipe(
        post_recipe(
            tmp_path / "run",
            model={"init": str(sft_policy)},
            data={"path": str(tmp_path / "prompts.jsonl"), "seq_len": 128},
            objective={"kind": "cfg_distill"},
            batch={"global_batch_size": 8, "micro_batch_size": 8},
            train={"max_steps": 2, "progress": False, "threads": 1},
            eval={"batches": 1},
            cfg={
                "guidance_scale": GAMMA,
                "diversity_weight": 1.0,
                "group_size": 4,
                "max_new_tokens": 12,
                "eval_prompts": 3,
                "eval_samples": 2,
                "etas": [0.0, 0.5, 1.0],
            },
        )  # fmt: skip
    )
    s = cfg_distill(recipe, progress=False)
    out = tmp_path / "run"
    for f in ("summary.json", "front.json", "quality/model/config.json",
              "diversity/model/config.json", "prompts.jsonl"):  # fmt: skip
        assert (out / f).exists() or (tmp_path / f).exists(), f
    assert (out / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    front = json.loads((out / "front.json").read_text())["front"]
    assert [r["t"] for r in front] == [0.0, 0.5, 1.0]
    for key in ("quality", "diversity"):
        assert front[0][key] == s["quality"][key]
        assert front[-1][key] == s["diversity"][key]
    assert s["teacher_guided"]["forwards_per_token"] == 2
    assert s["quality"]["forwards_per_token"] == 1
    metrics = [
        json.loads(x) for x in (out / "diversity" / "metrics.jsonl").read_text().splitlines()
    ]
    train = [m for m in metrics if m.get("kind") == "train"]
    assert len(train) == 2 and all("reward" in m and "pg" in m for m in train)


def test_rollouts_from_the_guided_teacher(teacher):
    """cfg.samples = "teacher": the source samples groups with CFG; rows are prompt +
    completion with the loss on the completion; no reward, no advantages."""
    from geode.infer import Engine
    from geode.post.cfgdistill import CfgRollouts, quality_fn, topic_prompts

    model, tok, unc = teacher
    source = CfgRollouts(
        tok, topic_prompts(3), rows=6, group_size=3, max_new_tokens=8, temperature=1.0,
        seed=0, quality=quality_fn("topic"), guidance=(GAMMA, unc),
    )  # fmt: skip
    source.engine = Engine(model, tok, max_batch=12, optimize=False, seed=0)
    batch = source.next_batch()
    assert len(batch) == 6 and batch.advantages is None
    assert 6 <= int(batch.loss_mask.sum()) <= 48
    assert set(source.last) >= {"sample_s", "sample_quality", "completion_tokens"}
    assert source.state_dict() == {"step": 1}


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"task": "poems"}, "cfg.task"),
        ({"samples": "teacher", "diversity_weight": 1.0}, "on-policy"),
        ({"group_size": 1}, "group_size"),
        ({"etas": [0.5, 1.5]}, "etas"),
    ],
)
def test_bad_cfg_sections_are_named(cfg, match, sft_policy, tmp_path):
    from geode.post.cfgdistill import cfg_distill
    from geode.recipe import RecipeError

    recipe = _cfg_recipe(sft_policy, tmp_path, cfg)
    with pytest.raises(RecipeError, match=match):
        cfg_distill(recipe)
