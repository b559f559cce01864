"""LoRA through `peft` on geode's decoder: inject, save in peft's layout, load back, merge.

LoRA (Hu et al. 2021, arXiv:2106.09685, eq. 3): a frozen weight W0 gets a trainable low-rank
update, h = W0 x + (alpha / r) * B A x, with A (r, in) random and B (out, r) zero at the start.
peft's `inject_adapter_in_model` wraps the matching `nn.Linear`s of geode's model; the saved
keys (adapter_config.json + adapter_model.safetensors, `base_model.model.model.layers.N...`)
carry the family's Hugging Face module names (the checkpoint key mapping of geode.family:
RecurrentGemma's `temporal_block`/`mlp_block`, Gemma 4's MoE parts on the decoder layer), so
they load with `PeftModel.from_pretrained` on transformers' Gemma3ForCausalLM,
Gemma4ForCausalLM or RecurrentGemmaForCausalLM, and `merged_copy` folds W0 + (alpha / r) B A
into plain weights for export.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..family import get_family
from ..fileio import atomic_write_bytes, swap_dir_into_place
from ..recipe import RecipeError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def lora_config(section: Any, base: str = "") -> Any:
    """A peft LoraConfig from a recipe's [lora] section."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=list(section.target_modules),
        bias="none",
        task_type=TaskType.CAUSAL_LM,
        base_model_name_or_path=base or None,
    )


def add_lora(model: nn.Module, section: Any, base: str = "") -> nn.Module:
    """Wrap the target linears of `model` with LoRA adapters; only adapters stay trainable."""
    from peft import inject_adapter_in_model

    cfg = lora_config(section, base)
    try:
        model = inject_adapter_in_model(cfg, model)
    except ValueError as e:
        raise RecipeError(f"lora.target_modules = {list(section.target_modules)}: {e}") from None
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    model.lora_config = cfg
    return model


def _map_key(model: nn.Module, name: str, to_hf: bool) -> str | None:
    """An adapter key `<module>.lora_X.weight` with its module path mapped by the family's
    checkpoint key mapping (applied to `<module>.weight`); None: the family ignores it."""
    if name.startswith("lm_head."):
        return name
    config = model.config
    spec = get_family(config.family)
    module, sep, tail = name.partition(".lora_")
    mapped = (spec.key_to_hf if to_hf else spec.key_from_hf)(config, f"{module}.weight")
    return None if mapped is None else mapped.removesuffix(".weight") + sep + tail


def _hf_key(model: nn.Module, name: str) -> str:
    """geode adapter key -> the key peft saves for the family's HF model."""
    key = _map_key(model, name, to_hf=True)
    return _PEFT_PREFIX + (key if key.startswith("lm_head.") else f"model.{key}")


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under peft's saved names (adapter name removed, HF module paths)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name="default", save_embedding_layers=False)
    return {_hf_key(model, k): v.detach().cpu().contiguous() for k, v in state.items()}


def save_adapter(model: nn.Module, path: str | Path, section: Any = None, base: str = "") -> Path:
    """Write adapter_config.json + adapter_model.safetensors (peft's layout) atomically to PATH."""
    from safetensors.torch import save

    cfg = getattr(model, "lora_config", None) or lora_config(section, base)
    conf = cfg.to_dict()
    conf = {k: sorted(v) if isinstance(v, set) else v for k, v in conf.items()}
    conf["task_type"] = str(conf.get("task_type") or "CAUSAL_LM").split(".")[-1]
    conf["peft_type"] = str(conf.get("peft_type") or "LORA").split(".")[-1]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    atomic_write_bytes(tmp / ADAPTER_WEIGHTS, save(adapter_state(model), {"format": "pt"}))
    atomic_write_bytes(tmp / ADAPTER_CONFIG, (json.dumps(conf, indent=1) + "\n").encode())
    os.chmod(tmp, 0o755)
    swap_dir_into_place(tmp, path)
    return path


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Inject and fill the adapters saved at PATH (by geode or peft) into a geode model."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    try:
        cfg = LoraConfig.from_pretrained(str(path))
        state = load_file(path / ADAPTER_WEIGHTS)
    except (OSError, ValueError) as e:
        raise RecipeError(f"{path}: not a LoRA adapter directory ({e})") from None
    model = inject_adapter_in_model(cfg, model)
    mine = {}
    for k, v in state.items():
        if not k.startswith(_PEFT_PREFIX):
            raise RecipeError(f"{path / ADAPTER_WEIGHTS}: unexpected tensor {k!r}")
        k = k[len(_PEFT_PREFIX) :]
        k = _map_key(model, k if k.startswith("lm_head.") else k.removeprefix("model."), False)
        if k is not None:  # None: a tensor the family's loader ignores (kv-shared k/v)
            mine[k] = v
    result = set_peft_model_state_dict(model, mine, adapter_name="default")
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise RecipeError(
            f"{path}: adapter does not fit the model (missing {missing[:3]}, unexpected "
            f"{list(result.unexpected_keys)[:3]})"
        )
    model.lora_config = cfg
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with every adapter merged into its base weight and removed."""
    from peft.tuners.lora import LoraLayer

    m = copy.deepcopy(model)
    for name, mod in list(m.named_modules()):
        if isinstance(mod, LoraLayer):
            mod.merge()
            parent, _, child = name.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, child, mod.get_base_layer())
    if hasattr(m, "lora_config"):
        del m.lora_config
    m.requires_grad_(True)
    return m
