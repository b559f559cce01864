"""Inference: hybrid KV cache, the generation engine, sampling and weight-only quantization."""

from .cache import HybridCache, kv_cache_bytes
from .engine import Delta, Engine, Request, Result, encode_prompt
from .sampling import RequestError, SamplingParams

__all__ = [
    "Delta",
    "Engine",
    "HybridCache",
    "Request",
    "RequestError",
    "Result",
    "SamplingParams",
    "encode_prompt",
    "kv_cache_bytes",
]
