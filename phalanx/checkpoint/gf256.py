"""GF(2^8) arithmetic for the erasure codec: scalar field ops, and bulk multiply-accumulate on uint8 tensors.

Bulk ops run in a native C kernel (`_gf256.c`: AVX-512/GFNI, AVX2 split-nibble PSHUFB or portable C, picked
per CPU) for CPU tensors, built on first use with the system C compiler into ~/.cache/phalanx and loaded with
ctypes. CUDA tensors use one Triton kernel per call (`_gf256_triton.py`; Triton ships with CUDA builds of
torch). Without a compiler or Triton they run as torch table lookups (one warning for the former).
The native kernel is memory-bound; the lookups are far slower (benchmarks/erasure.py, figures in
benchmarks/RESULTS.md).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import torch

_POLY = 0x11D  # x^8 + x^4 + x^3 + x^2 + 1, the usual Reed–Solomon field polynomial (also in _gf256.c)
_SOURCE = Path(__file__).with_name("_gf256.c")
_CFLAGS = ["-O3", "-shared", "-fPIC"]
# Set to 0 to skip the native kernel (tests compare the two paths this way).
NATIVE_ENV = "PHALANX_GF256_NATIVE"


def _tables() -> tuple[list[int], list[int]]:
    exp, log = [0] * 512, [0] * 256
    x = 1
    for i in range(255):
        exp[i], log[x] = x, i
        x <<= 1
        if x & 0x100:
            x ^= _POLY
    for i in range(255, 512):
        exp[i] = exp[i - 255]
    return exp, log


EXP, LOG = _tables()


def gf_mul(a: int, b: int) -> int:
    return 0 if a == 0 or b == 0 else EXP[LOG[a] + LOG[b]]


def gf_inv(a: int) -> int:
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(2^8)")
    return EXP[255 - LOG[a]]


# ---------------------------------------------------------------------------------------------- native kernel

def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "phalanx"


def _build(source: bytes) -> Path:
    """Compile _gf256.c once per source, compiler and machine; concurrent builders race harmlessly."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    key = hashlib.sha256(source + f"{cc} {_CFLAGS} {platform.machine()}".encode()).hexdigest()[:16]
    so = _cache_dir() / f"gf256-{key}.so"
    if so.exists():
        return so
    so.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=so.parent, prefix=f"{so.stem}.", suffix=".tmp")
    os.close(fd)
    try:
        done = subprocess.run([cc, *_CFLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"{cc} exited with {done.returncode}: {done.stderr.strip()[-500:]}")
        os.replace(tmp, so)  # atomic: another process sees no .so or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return so


@lru_cache(maxsize=None)
def native() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (then torch runs the bulk ops) with one warning why."""
    if os.environ.get(NATIVE_ENV, "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_build(_SOURCE.read_bytes())))
        lib.gf256_init.restype = lib.gf256_level.restype = lib.gf256_set_level.restype = ctypes.c_int
        lib.gf256_set_level.argtypes = [ctypes.c_int]
        lib.gf256_dot.restype = None
        lib.gf256_dot.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                  ctypes.c_size_t, ctypes.c_int]
        lib.gf256_advise_huge.restype = None
        lib.gf256_advise_huge.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.gf256_init()
        return lib
    except Exception as e:  # any failure to build or load: fall back, never crash a checkpoint
        warnings.warn(f"phalanx: the native GF(2^8) kernel is unavailable ({e}); erasure coding runs on torch, 20-40x "
                      f"slower. Install a C compiler (cc) and make {_cache_dir()} writable to speed it up.",
                      RuntimeWarning, stacklevel=2)
        return None


KERNELS = ("portable C", "AVX2 PSHUFB", "AVX2 GFNI", "AVX-512 GFNI")


def kernel_name() -> str:
    """Which kernel CPU tensors use now (for benchmark and log lines)."""
    lib = native()
    return KERNELS[lib.gf256_level()] if lib else "torch"


def set_kernel_level(level: int) -> int:
    """Force kernel `level` (an index into KERNELS, clamped to what this CPU runs); returns the level set, -1 without
    the native library. Tests and benchmarks use it; the default is the fastest."""
    lib = native()
    return lib.gf256_set_level(level) if lib else -1


# ---------------------------------------------------------------------------------------------- torch path

@lru_cache(maxsize=None)
def _mul_table(device: str) -> torch.Tensor:
    """(256, 256) uint8: row c is c * x for every byte x."""
    table = torch.tensor([[gf_mul(c, x) for x in range(256)] for c in range(256)], dtype=torch.uint8)
    return table.to(device)


def _dot_torch(outs: list[torch.Tensor], srcs: list[torch.Tensor], coefs: list[list[int]], accumulate: bool) -> None:
    # One 256-entry lookup per (source, output). The int32 index of a source is built once and shared by all
    # outputs: the index conversion, not the lookup, is most of the cost. On a GPU the 256-byte table row
    # stays in L1.
    table = _mul_table(str(srcs[0].device))
    if not accumulate:
        for out in outs:
            out.zero_()
    for j, src in enumerate(srcs):
        index = None
        for row, out in zip(coefs, outs):
            c = row[j]
            if c == 1:
                out ^= src
            elif c:
                index = src.int() if index is None else index
                out ^= torch.index_select(table[c], 0, index)


# ---------------------------------------------------------------------------------------------- bulk ops

def _use_native(tensors: list[torch.Tensor]) -> ctypes.CDLL | None:
    if all(t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return native()
    return None


def empty_block(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised block like `like`, for a bulk op to write. Large CPU blocks get huge pages where Linux
    offers them (see gf256_advise_huge in _gf256.c): first-touch page faults otherwise cost more than the math."""
    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    lib = _use_native([out]) if out.numel() >= 4 << 20 else None
    if lib is not None:
        lib.gf256_advise_huge(out.data_ptr(), out.numel())
    return out


@lru_cache(maxsize=None)
def triton_dot():
    """The Triton kernel's launcher for CUDA tensors, or None where Triton is not installed."""
    try:
        from phalanx.checkpoint._gf256_triton import gf_dot_cuda
    except ImportError:
        return None
    return gf_dot_cuda


def gf_dot(outs: list[torch.Tensor], srcs: list[torch.Tensor], coefs: list[list[int]],
           accumulate: bool = False) -> None:
    """outs[r] (^)= XOR_j coefs[r][j] * srcs[j], bytewise over 1-D uint8 tensors of one length, one device.

    accumulate=False overwrites outs; outs must then not overlap srcs (with one output, equal is allowed).
    """
    n = srcs[0].numel()
    lib = _use_native(outs + srcs)
    if lib is None:
        launch = triton_dot() if srcs[0].is_cuda and all(t.is_contiguous() for t in outs + srcs) else None
        if launch is not None and n and outs:
            launch(outs, srcs, coefs, _mul_table(str(srcs[0].device)), accumulate)
        else:
            _dot_torch(outs, srcs, coefs, accumulate)
        return
    if n == 0 or not outs:
        return
    m, k = len(outs), len(srcs)
    out_ptrs = (ctypes.c_void_p * m)(*[t.data_ptr() for t in outs])
    src_ptrs = (ctypes.c_void_p * k)(*[t.data_ptr() for t in srcs])
    flat = (ctypes.c_uint8 * (m * k))(*[c for row in coefs for c in row])
    lib.gf256_dot(out_ptrs, m, src_ptrs, k, flat, n, int(accumulate))


def _check_pair(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.dtype != torch.uint8 or src.dtype != torch.uint8 or dst.dim() != 1 or src.dim() != 1:
        raise ValueError(f"{what}: dst and src must be 1-D uint8 tensors, got {dst.dtype}{tuple(dst.shape)} and "
                         f"{src.dtype}{tuple(src.shape)}")
    if dst.numel() != src.numel() or dst.device != src.device:
        raise ValueError(f"{what}: dst ({dst.numel()} bytes on {dst.device}) and src ({src.numel()} bytes on "
                         f"{src.device}) must match in length and device")


def gf_mul_xor(dst: torch.Tensor, src: torch.Tensor, c: int) -> None:
    """dst ^= c * src in place, bytewise in GF(2^8); 1-D uint8 tensors of one length on one device."""
    _check_pair(dst, src, "gf_mul_xor")
    if not 0 <= c < 256:
        raise ValueError(f"gf_mul_xor: coefficient {c} is not a byte (0..255)")
    if c:
        gf_dot([dst], [src], [[c]], accumulate=True)


def xor_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst ^= src in place; 1-D uint8 tensors of one length on one device."""
    _check_pair(dst, src, "xor_into")
    gf_dot([dst], [src], [[1]], accumulate=True)
