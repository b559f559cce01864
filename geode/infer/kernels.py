"""Loader of the CPU decode kernels in kernels.c (built on first use with the system C compiler).

`gemv(kind, x, specs)` computes x W_i^T for several weights W_i sharing x (M <= 16 rows, float32),
reading each weight byte once: the memory-bound shape of decoding (6 rows and more take a
register-blocked GEMM path in the same call). `geode_run` (used by native.py) runs the whole
decoder for flattened new tokens of several cache rows in one call. Weights stay in the Hugging
Face (out, in) layout; formats: "f32", "bf16", "i8" (per-row scale), "i4" (group-wise scale/min).
Without a compiler or AVX2/FMA, `available()` is False and callers use torch ops.

Threads: a small pthread pool in kernels.c whose caller never waits for a helper that is not
running (an OpenMP barrier does, which on a shared machine stalls every parallel region for an
OS time slice). torch.get_num_threads() threads, the caller included. Build output is cached in
$GEODE_CACHE (default ~/.cache/geode).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

KINDS = {"f32": 0, "bf16": 1, "i8": 2, "i4": 3}
MAX_ROWS = 16  # x rows the per-module decode path sends to the kernels (torch's GEMM above)
GEMV_MAX_ROWS = 64  # x rows one gemv call takes (6 and more: register-blocked GEMM)
GEMM_MIN_ROWS = 6  # x rows from which the C side runs the register-blocked GEMM (kernels.c)
MAX_WEIGHTS = 8
_SOURCE = Path(__file__).with_name("kernels.c")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-pthread", "-fPIC", "-shared", "-std=gnu11"]
_lock = threading.Lock()
_threads = [0]  # kernel threads; 0 = torch.get_num_threads()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def _cpu_ok() -> bool:
    """AVX2 + FMA + F16C on an x86-64 CPU (Linux flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    line = next((x for x in flags.splitlines() if x.startswith("flags")), "")
    have = set(line.split())
    return {"avx2", "fma", "f16c"} <= have


def _build() -> ctypes.CDLL:
    """Compile kernels.c into the cache directory (once per source version) and load it."""
    src = _SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join(_FLAGS).encode()).hexdigest()[:16]
    root = Path(os.environ.get("GEODE_CACHE", Path.home() / ".cache" / "geode")) / "kernels"
    lib = root / f"geode_kernels_{key}.so"
    if not lib.exists():
        cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            raise RuntimeError("no C compiler (gcc/cc) found")
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            out = Path(tmp) / lib.name
            proc = subprocess.run(
                [cc, *_FLAGS, str(_SOURCE), "-o", str(out), "-lm"], capture_output=True, text=True
            )
            if proc.returncode != 0:
                raise RuntimeError(f"compiling {_SOURCE.name} failed:\n{proc.stderr[-2000:]}")
            os.replace(out, lib)  # atomic: concurrent builders race harmlessly
    handle = ctypes.CDLL(str(lib))
    P, Int, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    PP, PI = ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int)
    sigs = {
        # kind, M, K, x, nw, W, N, y, ldy, aux, aux2, G, packed W (or null), threads
        "geode_gemv": (ctypes.c_int, [Int, Int, Int, P, Int, PP, PI, P, Int, PP, PP, Int, PP, Int]),
        # N, K -> elements of a packed copy
        "geode_pack_size": (ctypes.c_long, [Int, Int]),
        # kind (0 f32, 1 bf16), N, K, W, P
        "geode_pack": (ctypes.c_int, [Int, Int, Int, P, P]),
        # rows, d, x, ldx, scale, eps, out
        "geode_rmsnorm": (None, [Int, Int, P, Int, P, F, P]),
        # rows, heads, d, x, ldx, scale, eps, cos, sin, out
        "geode_norm_rope": (None, [Int, Int, Int, P, Int, P, F, P, P, P]),
        # rows, hq, hk, d, q, ldq, k, ldk, scale_q, scale_k, eps, cos, sin, out_q, out_k
        "geode_qk_norm_rope": (None, [Int, Int, Int, Int, P, Int, P, Int, P, P, F, P, P, P, P]),
        # model, N -> workspace floats of a run of N tokens
        "geode_run_workspace": (ctypes.c_long, [P, Int]),
        # model, N, rows (int32), ids, pos (int64), nwant, want (int32), logits, work, threads
        "geode_run": (ctypes.c_int, [P, Int, P, P, P, Int, P, P, P, Int]),
        # rows, n, x, ldx, out (int64)
        "geode_argmax": (None, [Int, ctypes.c_long, P, ctypes.c_long, P]),
        # out (10 doubles: seconds per phase, solo count) -> steps since the last call
        "geode_decode_profile": (ctypes.c_int, [P]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(handle, name)
        fn.restype, fn.argtypes = res, args
    return handle


def load() -> ctypes.CDLL | None:
    """The kernel library, or None (reason in `load_error()`); built at most once per process."""
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    with _lock:
        if _lib is None and _error is None:
            if os.environ.get("GEODE_NO_KERNELS"):
                _error = "disabled by GEODE_NO_KERNELS"
            elif not _cpu_ok():
                _error = "CPU lacks AVX2/FMA/F16C (or /proc/cpuinfo is unreadable)"
            else:
                try:
                    _lib = _build()
                except (OSError, RuntimeError) as e:
                    _error = str(e)
    return _lib


def available() -> bool:
    """True when the compiled kernels can run here."""
    return load() is not None


def _need() -> ctypes.CDLL:
    """The library, or a RuntimeError saying why it cannot be used."""
    lib = load()
    if lib is None:
        raise RuntimeError(f"geode CPU kernels unavailable: {_error}")
    return lib


def load_error() -> str | None:
    """Why the kernels are unavailable (None when they are)."""
    load()
    return _error


class decode_threads:  # noqa: N801 (a context manager used like a function)
    """Within the block: torch ops single-threaded, the kernels on `n` threads (default: torch's).

    Decode steps are many small torch ops between the kernels; threading them buys little, and
    every OpenMP region waits for all its threads, which on a shared machine can stall for an OS
    time slice each. The kernels' own pool has no such wait (see kernels.c).
    """

    def __init__(self, n: int | None = None):
        self.n = n

    def __enter__(self) -> decode_threads:
        self.saved = (torch.get_num_threads(), _threads[0])
        _threads[0] = self.n or self.saved[0]
        if self.saved[0] > 1:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.saved[0] > 1:
            torch.set_num_threads(self.saved[0])
        _threads[0] = self.saved[1]


class WeightSpec:
    """Pointers and sizes of one weight in a kernel format (rebuilt when the weight changes)."""

    __slots__ = ("kind", "n", "k", "group", "tensors", "ptr", "aux", "aux2")

    def __init__(
        self,
        kind: str,
        weight: torch.Tensor,
        aux: torch.Tensor | None = None,
        aux2: torch.Tensor | None = None,
        group: int = 0,
        k: int | None = None,
    ):
        self.kind = KINDS[kind]
        self.n = weight.shape[0]
        self.k = k if k is not None else weight.shape[1]
        self.group = group
        self.tensors = (weight, aux, aux2)  # keep alive
        self.ptr = weight.data_ptr()
        self.aux = aux.data_ptr() if aux is not None else 0
        self.aux2 = aux2.data_ptr() if aux2 is not None else 0


def float_spec(w: torch.Tensor) -> WeightSpec | None:
    """Kernel view of a float32 / bfloat16 (N, K) CPU weight (None: other dtype or layout)."""
    if w.device.type != "cpu" or w.dim() != 2 or not w.is_contiguous():
        return None
    if w.dtype == torch.float32:
        return WeightSpec("f32", w.detach())
    if w.dtype == torch.bfloat16:
        # a view made under inference mode would be an inference tensor without a version
        # counter (NativeDecoder.pack tracks the weights' versions): keep it a normal view
        with torch.inference_mode(False):
            return WeightSpec("bf16", w.detach().view(torch.int16))
    return None


PACKABLE = {KINDS["f32"]: torch.float32, KINDS["bf16"]: torch.int16}  # kind -> packed dtype


def packed_shape(spec: WeightSpec) -> tuple[int, torch.dtype]:
    """Elements and dtype of `pack(spec)` (rows padded to whole tiles of the GEMM)."""
    if spec.kind not in PACKABLE:
        raise ValueError(f"only float32 / bfloat16 weights are packed, not kind {spec.kind}")
    return (_lib or _need()).geode_pack_size(spec.n, spec.k), PACKABLE[spec.kind]


def pack(spec: WeightSpec) -> torch.Tensor:
    """A float32 / bfloat16 weight copied into the layout the GEMM (6+ rows) streams (geode_pack)."""
    numel, dtype = packed_shape(spec)
    out = torch.empty(numel, dtype=dtype)
    if (_lib or _need()).geode_pack(spec.kind, spec.n, spec.k, spec.ptr, out.data_ptr()) != 0:
        raise RuntimeError(f"geode_pack failed for a ({spec.n}, {spec.k}) weight")
    return out


class GemvPlan:
    """Weights of one kind and input width computed by one call (e.g. q/k/v): y = x [W_1; W_2..]^T.

    packed: also keep float32 / bfloat16 weights in the GEMM's streaming layout (`pack`), which
    calls with 6+ rows read instead (the weights' bytes once more).
    """

    def __init__(self, specs: list[WeightSpec], packed: bool = False):
        if not 0 < len(specs) <= MAX_WEIGHTS:
            raise ValueError(f"a plan takes 1..{MAX_WEIGHTS} weights, got {len(specs)}")
        if len({(s.kind, s.k, s.group) for s in specs}) != 1:
            raise ValueError("weights of one plan must share kind, input width and group size")
        nw = len(specs)
        self.specs = tuple(specs)  # keep alive
        self.kind, self.k, self.group = specs[0].kind, specs[0].k, specs[0].group
        self.splits = [s.n for s in specs]
        self.total = sum(self.splits)
        arr = ctypes.c_void_p * nw
        self.nw = nw
        self.w = arr(*[s.ptr for s in specs])
        self.n = (ctypes.c_int * nw)(*self.splits)
        self.aux = arr(*[s.aux for s in specs])
        self.aux2 = arr(*[s.aux2 for s in specs])
        self.packed = [pack(s) for s in specs] if packed else []  # keep alive
        self.p = arr(*[t.data_ptr() for t in self.packed]) if packed else None


def gemv(x: torch.Tensor, plan: GemvPlan) -> torch.Tensor:
    """x (M, K) float32 contiguous, M <= GEMV_MAX_ROWS -> (M, sum N_i): [x W_1^T | x W_2^T | ...]."""
    M = x.shape[0]
    y = torch.empty(M, plan.total, dtype=torch.float32)
    rc = (_lib or _need()).geode_gemv(
        plan.kind, M, plan.k, x.data_ptr(), plan.nw, plan.w, plan.n, y.data_ptr(), plan.total,
        plan.aux, plan.aux2, plan.group, plan.p, _threads[0] or torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"geode_gemv failed with code {rc}")
    return y


def rmsnorm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma RMSNorm of x (..., d) float32 (last dim contiguous) with scale = 1 + w (d,)."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.float32)
    (_lib or _need()).geode_rmsnorm(x2.shape[0], d, x2.data_ptr(), x2.stride(0), scale.data_ptr(), eps,
                       out.data_ptr())  # fmt: skip
    return out.view(x.shape)


def norm_rope(
    x: torch.Tensor, heads: int, scale: torch.Tensor, eps: float, cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """x (N, heads*d) float32 rows -> per-head RMSNorm then RoPE with cos/sin (N, d): (N, heads, d)."""
    n = x.shape[0]
    d = scale.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.reshape(n, d).contiguous(), sin.reshape(n, d).contiguous()
    out = torch.empty(n, heads, d, dtype=torch.float32)
    (_lib or _need()).geode_norm_rope(n, heads, d, x.data_ptr(), x.stride(0), scale.data_ptr(), eps,
                         cos.data_ptr(), sin.data_ptr(), out.data_ptr())  # fmt: skip
    return out


def qk_norm_rope(
    q: torch.Tensor, k: torch.Tensor, hq: int, hk: int, scale_q: torch.Tensor,
    scale_k: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """q (N, hq*d), k (N, hk*d) float32 rows -> (N, hq, d), (N, hk, d): QK-norm then RoPE."""
    n, d = q.shape[0], scale_q.shape[0]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    cos, sin = cos.reshape(n, d).contiguous(), sin.reshape(n, d).contiguous()
    out_q = torch.empty(n, hq, d, dtype=torch.float32)
    out_k = torch.empty(n, hk, d, dtype=torch.float32)
    (_lib or _need()).geode_qk_norm_rope(
        n, hq, hk, d, q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), scale_q.data_ptr(),
        scale_k.data_ptr(), eps, cos.data_ptr(), sin.data_ptr(), out_q.data_ptr(), out_k.data_ptr(),
    )  # fmt: skip
    return out_q, out_k


def argmax(z: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax of z (B, V) float32 on CPU, first index on ties (as torch.argmax), one
    vectorized pass per row: torch's single-threaded argmax is ~10x slower at this shape."""
    if z.dtype != torch.float32 or z.dim() != 2 or z.device.type != "cpu" or z.stride(1) != 1:
        return z.argmax(-1)
    lib = load()
    if lib is None:
        return z.argmax(-1)
    out = torch.empty(z.shape[0], dtype=torch.long)
    lib.geode_argmax(z.shape[0], z.shape[1], z.data_ptr(), z.stride(0), out.data_ptr())
    return out
