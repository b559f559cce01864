"""SFT: assistant-only loss, per-conversation attention in packed rows, LoRA in peft's layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import geode
from geode.chat import render, render_parts
from geode.cli import main
from geode.data import DataError
from geode.recipe import RecipeError
from geode.train import load_train_recipe
from geode.train import sft as S
from geode.train.loop import Trainer
from geode.train.loss import next_token_loss_sum
from geode.train.metrics import curve, read_metrics
from tests.train.helpers import tiny_recipe, write_recipe

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
AGENT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {
            "role": "assistant",
            "thinking": "I should call add.",
            "content": "",
            "tool_calls": [{"id": "c0", "function": {"name": "add", "arguments": '{"a": 2}'}}],
        },
        {"role": "tool", "tool_call_id": "c0", "content": "5"},
        {"role": "assistant", "content": "2+3 = 5"},
    ],
    "tools": TOOLS,
}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    """A small SentencePiece tokenizer, a random tiny base model with it, task chat data."""
    from geode.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("sft")
    paths = S.write_task_data(root / "data", n_train=48, n_heldout=8)
    texts = [render(c["messages"]) for c in S.task_conversations(200, "train", seed=1)]
    tok = train_tokenizer(texts=texts, vocab_size=1000, out=root / "tokenizer.model")
    shape = dict(tiny_recipe(Path("x"))["model"]["overrides"], vocab_size=tok.vocab_size)
    cfg = geode.get_preset("nano-1m").replace(**shape)
    geode.save_model(geode.build_model(cfg, seed=0), root / "base",
                     files={"tokenizer.model": root / "tokenizer.model"})  # fmt: skip
    return {"root": root, "base": root / "base", "tok": root / "tokenizer.model", **paths}


def _recipe(env, **sections) -> dict:
    r = tiny_recipe(
        env["train"],
        model={"init": str(env["base"]), "overrides": {}},
        data={"path": str(env["train"]), "eval_path": str(env["heldout"]), "seq_len": 256},
        objective={"kind": "sft"},
        batch={"global_batch_size": 4, "micro_batch_size": 2},
        optim={"lr": 3e-3, "warmup_steps": 1},
        train={"max_steps": 6},
        checkpoint={"export": True},
    )
    for name, values in sections.items():
        r[name] = {**r.get(name, {}), **values} if isinstance(values, dict) else values
    return r


def test_render_parts_label_the_assistant_spans():
    parts = render_parts(AGENT["messages"], tools=TOOLS)
    assert "".join(t for _, t in parts) == render(AGENT["messages"], False, TOOLS)
    said = [t for k, t in parts if k == "assistant"]
    assert said == [
        "<start_of_thinking>I should call add.<end_of_thinking>", "<end_of_turn>",
        "2+3 = 5", "<end_of_turn>",
    ]  # fmt: skip
    calls = [t for k, t in parts if k == "tool_call"]
    assert len(calls) == 1 and '"name": "add"' in calls[0]
    prompt = "".join(t for k, t in parts if k == "prompt")
    assert "Be brief." in prompt and '"content": "5"' in prompt and "2+3 = 5" not in prompt


def test_trained_tokens_are_the_assistant_text_and_optionally_tool_calls(env):
    tok = geode.load_tokenizer(env["tok"])
    enc = S.encode_conversation(tok, AGENT)
    trained = tok.decode([i for i, t in zip(enc.ids, enc.trained) if t])
    assert trained == (
        "<start_of_thinking>I should call add.<end_of_thinking><end_of_turn>2+3 = 5<end_of_turn>"
    )
    with_calls = S.encode_conversation(tok, AGENT, tool_calls=True)
    got = tok.decode([i for i, t in zip(with_calls.ids, with_calls.trained) if t])
    assert "<start_of_tool_call>" in got and '"add"' in got and with_calls.ids == enc.ids
    assert tok.decode(enc.ids) == render(AGENT["messages"], False, TOOLS)


def _trainer(env, tmp_path, **sections) -> Trainer:
    recipe = load_train_recipe(_recipe(env, **sections))
    return Trainer(recipe, out=tmp_path / "run", data=S.prepare(recipe))


def test_gradient_flows_only_from_assistant_tokens(env, tmp_path):
    """Through the trainer's SFT objective: d loss / d (final hidden state) is non-zero exactly
    at positions whose target is an assistant token of the same conversation, those targets
    decode to the assistant turns, and the loss equals the masked CE on full logits."""
    trainer = _trainer(env, tmp_path)
    batch = trainer.loader.next_batch()
    kept = {}
    hook = trainer.raw_model.norm.register_forward_hook(
        lambda m, a, out: kept.setdefault("h", out.retain_grad() or out)
    )
    total, n, _ = trainer.objective.loss_sum(trainer.model, batch)
    hook.remove()
    total.backward()
    grad = kept["h"].grad.abs().sum(-1)  # (B, T)
    assert torch.equal(grad > 0, batch.loss_mask) and n == batch.loss_mask.sum() > 0
    with torch.no_grad():
        full = trainer.raw_model(**batch.model_inputs())  # (B, T, V)
    ref, _, _ = next_token_loss_sum(full, batch.targets, batch.loss_mask)
    torch.testing.assert_close(total.detach(), ref, rtol=1e-5, atol=1e-4)
    tok = geode.load_tokenizer(env["tok"])
    for b in range(len(batch)):
        seg, toks, m = batch.segment_ids[b], batch.tokens[b], batch.loss_mask[b]
        for s in seg.unique().tolist():
            where = (seg[1:] == s) & m  # targets of conversation s
            if not where.any():
                continue
            text = tok.decode(toks[1:][where].tolist())
            assert text.endswith("<end_of_turn>") and "####" in text
            assert "<start_of_turn>" not in text
        assert not m[seg[1:] != seg[:-1]].any()  # no target across a conversation boundary


def test_packed_conversations_do_not_attend_across_boundaries(env):
    """Logits of a conversation inside a packed row equal its logits alone, and changing the
    other conversations of the row changes nothing in it."""
    tok = geode.load_tokenizer(env["tok"])
    docs = [S.encode_conversation(tok, c) for c in S.read_conversations(env["train"])[:6]]
    arrays, st = S.pack(docs, 400, tok.pad_id)
    row = int(np.argmax(arrays["segment_ids"].max(1)))  # the row with the most conversations
    seg = torch.from_numpy(arrays["segment_ids"][row])
    assert st.rows < 6 and seg.max() >= 2
    model = geode.load_model(env["base"])
    batch = S.rows_to_batch(arrays, np.array([row]))
    with torch.no_grad():
        packed = model(**batch.model_inputs())[0]  # (T, V)
        for s in range(int(seg.max())):  # every conversation (the last segment is padding)
            idx = (seg[:-1] == s).nonzero()[:, 0]
            alone = model(batch.tokens[0, idx][None])[0]
            torch.testing.assert_close(packed[idx], alone, rtol=1e-5, atol=1e-5)
        other = batch.tokens.clone()
        other[0, :-1][seg[:-1] != 1] = 7  # rewrite every token outside conversation 1
        changed = model(other[:, :-1], positions=batch.positions[:, :-1],
                        segment_ids=batch.segment_ids[:, :-1])[0]  # fmt: skip
        inside = (seg[:-1] == 1).nonzero()[:, 0]
        torch.testing.assert_close(changed[inside], packed[inside], rtol=1e-5, atol=1e-5)


def test_full_sft_learns_and_exports_a_loadable_model(env, tmp_path):
    recipe = write_recipe(tmp_path / "sft.toml", _recipe(env, train={"max_steps": 12}))
    out = tmp_path / "full"
    assert main(["sft", str(recipe), "--out", str(out), "--no-progress"]) == 0
    losses = list(curve(read_metrics(out / "metrics.jsonl"), "train", "loss").values())
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3])
    evals = curve(read_metrics(out / "metrics.jsonl"), "eval", "eval_loss")
    assert list(evals) == [12] and np.isfinite(evals[12])
    assert (out / "model" / "tokenizer.model").read_bytes() == env["tok"].read_bytes()
    assert (
        geode.load_model(out / "model").config.vocab_size
        == geode.load_model(env["base"]).config.vocab_size
    )


def test_lora_adapter_loads_in_peft_and_transformers_and_merges(env, tmp_path):
    """geode's LoRA run: OUT/adapter in peft's layout gives transformers + peft the same logits
    as geode with the adapter; OUT/model (merged) gives the same logits again."""
    from peft import PeftModel
    from transformers import Gemma3ForCausalLM

    from geode.train.sft_lora import load_adapter

    recipe = load_train_recipe(
        _recipe(env, lora={"r": 4, "alpha": 8.0}, optim={"lr": 2e-2, "warmup_steps": 1})
    )
    trainer = Trainer(recipe, out=tmp_path / "lora", data=S.prepare(recipe))
    trainable = {n for n, p in trainer.raw_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    base = {
        n: p.detach().clone() for n, p in trainer.raw_model.named_parameters() if n not in trainable
    }
    trainer.fit()
    assert all(
        torch.equal(p, base[n]) for n, p in trainer.raw_model.named_parameters() if n in base
    )
    adapter = tmp_path / "lora" / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    ids = torch.from_numpy(S.pack([S.encode_conversation(geode.load_tokenizer(env["tok"]), AGENT)],
                                  200, 0)[0]["tokens"][:, :64])  # fmt: skip
    geo = load_adapter(geode.load_model(env["base"]), adapter).eval()
    with torch.no_grad():
        ours = geo(ids)
        hf = Gemma3ForCausalLM.from_pretrained(env["base"], attn_implementation="eager",
                                               dtype=torch.float32)  # fmt: skip
        theirs = PeftModel.from_pretrained(hf, adapter).eval()(input_ids=ids).logits
        merged = geode.load_model(tmp_path / "lora" / "model")(ids)
        plain = geode.load_model(env["base"])(ids)
    assert (ours - plain).abs().max() > 1e-3  # the adapter learned something
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged, ours, rtol=1e-4, atol=1e-4)


def test_bad_sft_input_is_named(env, tmp_path):
    tok = geode.load_tokenizer(env["tok"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: the conversation has no assistant turn"):
        S.encode_conversation(tok, S.read_conversations(bad)[0])
    bad.write_text('{"messages": []}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not JSON"):
        S.read_conversations(bad)
    bad.write_text('{"text": "no messages"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: expected an object with a 'messages' list"):
        S.read_conversations(bad)
    with pytest.raises(RecipeError, match="unknown key 'tool_call'"):
        load_train_recipe(_recipe(env, objective={"kind": "sft", "options": {"tool_call": True}}))
    recipe = write_recipe(tmp_path / "r.toml", _recipe(env, data={"path": str(bad)}))
    assert main(["sft", str(recipe), "--out", str(tmp_path / "o")]) == 2


@pytest.mark.parametrize("name", ["sft-nano", "sft-nano-lora"])
def test_shipped_recipes_run(env, tmp_path, name):
    """recipes/post/*.toml as shipped, pointed at the test model and data for two steps."""
    root = Path(__file__).resolve().parents[2]
    sets = [f"model.init={env['base']}", f"data.path={env['train']}",
            f"data.eval_path={env['heldout']}", "batch.global_batch_size=2",
            "batch.micro_batch_size=2", "optim.warmup_steps=0", "eval.batches=1",
            "train.threads=1"]  # fmt: skip
    args = ["sft", str(root / "recipes" / "post" / f"{name}.toml"), "--out", str(tmp_path / name),
            "--max-steps", "2", "--no-progress", *[x for s in sets for x in ("--set", s)]]  # fmt: skip
    assert main(args) == 0
    assert (tmp_path / name / "model" / "config.json").is_file()
    assert (tmp_path / name / "adapter").is_dir() == name.endswith("lora")


def test_packed_rows_shard_by_rank_and_resume_exactly():
    """Two ranks together serve exactly the rows one rank serves, every row once per epoch,
    and a loader restored from its state continues with the same rows."""
    R, T1 = 10, 6
    arrays = {
        "tokens": np.arange(R * T1).reshape(R, T1),
        "positions": np.tile(np.arange(T1), (R, 1)),
        "segment_ids": np.zeros((R, T1), np.int64),
        "trained": np.ones((R, T1), bool),
    }
    one = S.PackedRows(arrays, 4, seed=3)
    two = [S.PackedRows(arrays, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    served = []
    for _ in range(5):
        a = one.next_batch().windows.tolist()
        b = [w for ld in two for w in ld.next_batch().windows.tolist()]
        assert a == b
        served += a
    assert sorted(served[:10]) == list(range(10)) and sorted(served[10:20]) == list(range(10))
    state = one.state_dict()
    again = S.PackedRows(arrays, 4, seed=3)
    again.load_state_dict(state)
    assert again.next_batch().windows.tolist() == one.next_batch().windows.tolist()
    with pytest.raises(DataError, match="saved for 10 rows"):
        S.PackedRows({k: v[:5] for k, v in arrays.items()}, 4, seed=3).load_state_dict(state)
