"""Inference: hybrid KV cache, the generation engine, sampling and weight-only quantization."""

from .cache import HybridCache, kv_cache_bytes
from .engine import Delta, Engine, Request, Result
from .sampling import RequestError, SamplingParams

__all__ = [
    "Delta",
    "Engine",
    "HybridCache",
    "Request",
    "RequestError",
    "Result",
    "SamplingParams",
    "kv_cache_bytes",
]
