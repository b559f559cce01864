"""SFT and distillation for every family (issue #17 item 5): `geode sft` (full weights and LoRA)
on tiny random Gemma 4 MoE and RecurrentGemma checkpoints that transformers saved, and
distillation of a Gemma 4 MoE and a RecurrentGemma student from a Gemma 3 teacher with the same
vocabulary: a few steps, the loss falls, and the exported model loads in transformers
(Gemma4ForCausalLM / RecurrentGemmaForCausalLM) with equal float32 logits; LoRA adapters are
saved under the Hugging Face module names of the family, so peft on transformers' model gives
geode's logits; LoRA targets that the family does not have are refused by name."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import geode
from geode.cli import main
from geode.config import get_preset
from geode.recipe import RecipeError
from geode.train import load_train_recipe, train_distilled
from geode.train import sft as S
from geode.train.loop import Trainer
from geode.train.metrics import curve, read_metrics
from tests.post.test_sft import _recipe, env  # noqa: F401  (env: tokenizer + chat data fixture)
from tests.test_family import G4_CONFIGS, RG_CONFIGS, _reload, hf_gemma4, hf_recurrent
from tests.train.helpers import synthetic_dataset, tiny_recipe, write_recipe
from tests.train.test_moe_train import MOE

# family -> (transformers class name, a random transformers model of vocabulary V)
BASES = {
    "gemma4": (
        "Gemma4ForCausalLM",
        lambda v: hf_gemma4(3, **{**G4_CONFIGS["moe-kvshare-softcap"], "vocab_size": v}),
    ),
    "recurrent_gemma": (
        "RecurrentGemmaForCausalLM",
        lambda v: hf_recurrent(2, **RG_CONFIGS["lru-wider-gqa"], vocab_size=v),
    ),
}
RG_STUDENT = {
    "preset": "recurrentgemma-nano",
    "overrides": {
        "vocab_size": 64,
        "num_hidden_layers": 3,
        "layer_types": ["recurrent", "recurrent", "sliding_attention"],
    },
}


def _hf_class(name: str):
    import transformers

    return getattr(transformers, name)


@pytest.fixture(scope="module")
def bases(env, tmp_path_factory):  # noqa: F811
    """family -> a directory transformers saved (random weights, the env tokenizer beside)."""
    vocab = geode.load_tokenizer(env["tok"]).vocab_size
    out = {}
    for family, (_, build) in BASES.items():
        path = tmp_path_factory.mktemp(family)
        build(vocab).save_pretrained(path)
        shutil.copy(env["tok"], path / "tokenizer.model")
        out[family] = path
    return out


def _same_logits_in_transformers(cls_name: str, model_dir, vocab: int) -> None:
    """geode and transformers load `model_dir` (every tensor found) and give equal logits."""
    ids = torch.randint(3, vocab, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = geode.load_model(model_dir)(ids)
        theirs = _reload(_hf_class(cls_name), model_dir)(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def _falls(values) -> bool:
    values = list(values)
    return np.mean(values[-2:]) < np.mean(values[:2])


def _sft_recipe(env, base, **sections):  # noqa: F811
    return _recipe(
        {**env, "base": base},
        data={"path": str(env["train"]), "eval_path": str(env["heldout"]), "seq_len": 128},
        train={"max_steps": 4},
        **sections,
    )


@pytest.mark.parametrize("family", list(BASES))
def test_full_sft_of_each_family_learns_and_exports_for_transformers(env, bases, family, tmp_path):  # noqa: F811
    recipe = write_recipe(tmp_path / "sft.toml", _sft_recipe(env, bases[family]))
    out = tmp_path / "full"
    assert main(["sft", str(recipe), "--out", str(out), "--no-progress"]) == 0
    losses = curve(read_metrics(out / "metrics.jsonl"), "train", "loss").values()
    assert len(losses) == 4 and _falls(losses)
    model = geode.load_model(out / "model")
    assert model.config.family == family
    base = geode.load_model(bases[family])
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed  # the weights moved
    _same_logits_in_transformers(BASES[family][0], out / "model", model.config.vocab_size)


@pytest.mark.parametrize("family", list(BASES))
def test_lora_sft_of_each_family_loads_in_peft_and_merges(env, bases, family, tmp_path):  # noqa: F811
    """The adapter (peft's layout, HF module names) on transformers' model gives geode's logits
    with the adapter; the merged OUT/model gives them again through transformers."""
    from peft import PeftModel

    from geode.train.sft_lora import load_adapter

    recipe = load_train_recipe(
        _sft_recipe(env, bases[family], lora={"r": 4, "alpha": 8.0},
                    optim={"lr": 2e-2, "warmup_steps": 1})
    )  # fmt: skip
    trainer = Trainer(recipe, out=tmp_path / "lora", data=S.prepare(recipe))
    trainable = {n for n, p in trainer.raw_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer.fit()
    losses = curve(read_metrics(tmp_path / "lora" / "metrics.jsonl"), "train", "loss").values()
    assert _falls(losses)
    adapter = tmp_path / "lora" / "adapter"
    vocab = trainer.raw_model.config.vocab_size
    ids = torch.randint(3, vocab, (2, 11), generator=torch.Generator().manual_seed(1))
    cls = _hf_class(BASES[family][0])
    with torch.no_grad():
        ours = load_adapter(geode.load_model(bases[family]), adapter).eval()(ids)
        plain = geode.load_model(bases[family])(ids)
        hf = cls.from_pretrained(bases[family], attn_implementation="eager", dtype=torch.float32)
        theirs = PeftModel.from_pretrained(hf, adapter).eval()(input_ids=ids).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapter learned something
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    _same_logits_in_transformers(BASES[family][0], tmp_path / "lora" / "model", vocab)
    with torch.no_grad():
        merged = geode.load_model(tmp_path / "lora" / "model")(ids)
    torch.testing.assert_close(merged, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("family", "target"),
    [("gemma4", "experts"), ("gemma4", "linear_x"), ("recurrent_gemma", "gate_up_proj")],
)
def test_lora_targets_the_family_lacks_are_refused_by_name(env, bases, family, target, tmp_path):  # noqa: F811
    recipe = load_train_recipe(_sft_recipe(env, bases[family], lora={"target_modules": [target]}))
    with pytest.raises(RecipeError, match=rf"lora.target_modules = \['{target}'\]"):
        Trainer(recipe, out=tmp_path / "bad", data=S.prepare(recipe))


@pytest.fixture(scope="module")
def gemma3_teacher(tmp_path_factory):
    """(synthetic data, a random Gemma 3 teacher of the data's 64-token vocabulary); its tied
    embeddings scaled by 30 make its next-token distributions sharp (a random one is near
    uniform: nothing to learn)."""
    root = tmp_path_factory.mktemp("distill-family")
    data = synthetic_dataset(root / "data")
    shape = tiny_recipe(data)["model"]["overrides"]
    teacher = geode.build_model(get_preset("nano-1m").replace(**shape), seed=5)
    with torch.no_grad():
        teacher.embed_tokens.weight.mul_(30.0)
    geode.save_model(teacher, root / "t")
    return data, root / "t"


@pytest.mark.parametrize(
    ("student", "cls_name"),
    [(MOE, "Gemma4ForCausalLM"), (RG_STUDENT, "RecurrentGemmaForCausalLM")],
    ids=["gemma4-moe", "recurrent_gemma"],
)
def test_distill_a_family_student_from_a_gemma3_teacher(
    gemma3_teacher, student, cls_name, tmp_path
):
    """Online distillation (the full 64-token teacher distribution, K = V): the KL to the
    teacher falls, and the exported student loads in transformers with equal logits."""
    data, teacher = gemma3_teacher
    recipe = tiny_recipe(
        data,
        model=student,
        train={"max_steps": 4},
        eval={"every": 4},
        checkpoint={"export": True},
        distill={"teacher": str(teacher), "top_k": 64, "sampling": "top"},
    )
    train_distilled(load_train_recipe(recipe), out=tmp_path, control=False)
    records = read_metrics(tmp_path / "student" / "metrics.jsonl")
    kl = curve(records, "train", "distill_kl").values()
    assert len(kl) == 4 and _falls(kl) and min(kl) < 0.8 * max(kl)
    model_dir = tmp_path / "student" / "model"
    assert geode.load_model(model_dir).config.family == get_preset(student["preset"]).family
    _same_logits_in_transformers(cls_name, model_dir, 64)
