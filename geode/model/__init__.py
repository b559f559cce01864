"""The model family: layers, attention, and the decoder."""

from .attention import KVCache, attention_mask
from .transformer import Transformer, build_model, check_dtype

__all__ = ["KVCache", "Transformer", "attention_mask", "build_model", "check_dtype"]
