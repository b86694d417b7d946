"""Erasure codec throughput: phalanx's Reed–Solomon GF(2^8) codec vs zfec and pyeclib, one CPU thread.

    .venv/bin/python benchmarks/erasure.py [--mib 64] [--repeats 5] [--kernels]
    .venv/bin/python benchmarks/erasure.py --quick     # 1 MiB, one repeat: checks it runs

For each (k, m) in (4, 2), (2, 1), (8, 3) every codec encodes the same `--mib` MiB of data (k blocks) into m
parity blocks, then decodes the data with the first m data blocks lost (the worst case: every lost byte is
rebuilt from parity). Figures are data bytes per second (k * block / seconds), medians of `--repeats` runs,
outputs allocated by each codec as its API does. phalanx is also timed writing into reused parity buffers
(`encode(data, out=...)`) and on its torch path (what GPU tensors, or a machine without cc, use).

zfec (GPL) and pyeclib are peers to compare against, not dependencies: `pip install zfec pyeclib` to include
them. pyeclib runs its fastest installed backend (isa_l_rs_vand if its wheel bundles ISA-L, else
liberasurecode_rs_vand); its encode also splits one bytes object into fragments with headers, as its API does.
The last line printed is JSON (the (4, 2) figures at top level, every config under "configs"), with
`speedup` = phalanx encode GB/s / zfec's at (4, 2); without zfec installed, / phalanx's own torch path's
(`anchor` names which).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Callable
from unittest import mock

import torch

from phalanx.checkpoint import gf256
from phalanx.checkpoint.erasure import ErasureCodec

CONFIGS = ((4, 2), (2, 1), (8, 3))
PYECLIB_BACKENDS = ("isa_l_rs_vand", "liberasurecode_rs_vand")
QUICK = {"mib": 1, "repeats": 1}  # --quick: checks the script runs; not a result


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm: first-call setup (kernel build, tables, matrix inverses) is not throughput
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _phalanx(k: int, m: int, data: list[torch.Tensor], repeats: int) -> dict:
    codec = ErasureCodec(k, m)
    parity = codec.encode(data)
    survivors = {i: b for i, b in enumerate(data + parity) if i >= m}  # data blocks 0..m-1 lost
    assert all(torch.equal(a, b) for a, b in zip(codec.decode(survivors), data))
    out = [torch.empty_like(p) for p in parity]
    nbytes = k * data[0].numel()
    return {
        "encode_gbps": _gbps(nbytes, _median_seconds(lambda: codec.encode(data), repeats)),
        "decode_gbps": _gbps(nbytes, _median_seconds(lambda: codec.decode(survivors), repeats)),
        "encode_reuse_gbps": _gbps(nbytes, _median_seconds(lambda: codec.encode(data, out=out), repeats)),
    }


def _zfec(k: int, m: int, data: list[bytes], repeats: int) -> dict | None:
    try:
        import zfec
    except ImportError:
        return None
    encoder, decoder = zfec.Encoder(k, k + m), zfec.Decoder(k, k + m)
    wanted = tuple(range(k, k + m))
    shares = tuple(data) + tuple(encoder.encode(tuple(data), wanted))
    ids = tuple(range(m, k + m))
    survivors = tuple(shares[i] for i in ids)
    assert [bytes(b) for b in decoder.decode(survivors, ids)] == data
    nbytes = k * len(data[0])
    return {
        "encode_gbps": _gbps(nbytes, _median_seconds(lambda: encoder.encode(tuple(data), wanted), repeats)),
        "decode_gbps": _gbps(nbytes, _median_seconds(lambda: decoder.decode(survivors, ids), repeats)),
    }


def _pyeclib(k: int, m: int, data: list[bytes], repeats: int) -> dict | None:
    try:
        from pyeclib.ec_iface import ECDriver
    except ImportError:
        return None
    payload = b"".join(data)
    for backend in PYECLIB_BACKENDS:
        try:
            driver = ECDriver(k=k, m=m, ec_type=backend)
            fragments = driver.encode(payload)
            break
        except Exception:  # backend library not in this install: try the next
            continue
    else:
        return None
    survivors = fragments[m:]  # fragments are data 0..k-1 then parity
    assert driver.decode(survivors) == payload
    return {
        "backend": backend,
        "encode_gbps": _gbps(len(payload), _median_seconds(lambda: driver.encode(payload), repeats)),
        "decode_gbps": _gbps(len(payload), _median_seconds(lambda: driver.decode(survivors), repeats)),
    }


def measure_codecs(k: int, m: int, nbytes: int, repeats: int = 5) -> dict:
    """Encode/decode GB/s of phalanx (native and torch path), zfec and pyeclib for one (k, m) on `nbytes` of data,
    one thread. Peers that are not installed give None figures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        block = -(-nbytes // k)
        gen = torch.Generator().manual_seed(k * 100 + m)
        data = [torch.randint(0, 256, (block,), dtype=torch.uint8, generator=gen) for _ in range(k)]
        raw = [bytes(b.numpy()) for b in data]
        ours = _phalanx(k, m, data, repeats)
        with mock.patch.object(gf256, "native", lambda: None):  # the torch path, as GPU tensors run it
            torch_path = _phalanx(k, m, data, max(1, repeats // 2))
        zf, pe = _zfec(k, m, raw, repeats), _pyeclib(k, m, raw, repeats)
    finally:
        torch.set_num_threads(threads)
    return {
        "k": k, "m": m, "data_bytes": k * block, "kernel": gf256.kernel_name(),
        **ours,
        "torch_encode_gbps": torch_path["encode_gbps"], "torch_decode_gbps": torch_path["decode_gbps"],
        "zfec_encode_gbps": zf and zf["encode_gbps"], "zfec_decode_gbps": zf and zf["decode_gbps"],
        "pyeclib_backend": pe and pe["backend"],
        "pyeclib_encode_gbps": pe and pe["encode_gbps"], "pyeclib_decode_gbps": pe and pe["decode_gbps"],
        "speedup_vs_zfec": zf and ours["encode_gbps"] / zf["encode_gbps"],
        "decode_speedup_vs_zfec": zf and ours["decode_gbps"] / zf["decode_gbps"],
        "speedup_vs_pyeclib": pe and ours["encode_gbps"] / pe["encode_gbps"],
    }


def measure_kernels(k: int, m: int, nbytes: int, repeats: int = 5) -> dict[str, float]:
    """phalanx encode GB/s into reused buffers with each native kernel this CPU runs (one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        codec, block = ErasureCodec(k, m), -(-nbytes // k)
        data = [torch.randint(0, 256, (block,), dtype=torch.uint8) for _ in range(k)]
        out = codec.encode(data)
        figures = {}
        for level in range(gf256.set_kernel_level(99) + 1):
            gf256.set_kernel_level(level)
            seconds = _median_seconds(lambda: codec.encode(data, out=out), repeats)
            figures[gf256.KERNELS[level]] = _gbps(k * block, seconds)
    finally:
        gf256.set_kernel_level(99)
        torch.set_num_threads(threads)
    return figures


def _fmt(x: float | None) -> str:
    return "not installed" if x is None else f"{x:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="data MiB per (k, m) config")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kernels", action="store_true", help="also time each native kernel (k=4, m=2)")
    parser.add_argument("--quick", action="store_true", help="1 MiB, one repeat (the test suite's run)")
    if parser.parse_known_args()[0].quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args()
    rows = [measure_codecs(k, m, args.mib << 20, args.repeats) for k, m in CONFIGS]
    head = rows[0]
    print(f"erasure codec, {args.mib} MiB of data per config, one thread, GB/s of data; phalanx kernel: "
          f"{head['kernel']}; pyeclib backend: {head['pyeclib_backend'] or 'not installed'}")
    cols = ["k,m", "phalanx enc", "phalanx dec", "enc reused out", "torch-path enc", "torch-path dec",
            "zfec enc", "zfec dec", "pyeclib enc", "pyeclib dec", "enc vs zfec"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join([f"{r['k']},{r['m']}", *(_fmt(r[key]) for key in (
            "encode_gbps", "decode_gbps", "encode_reuse_gbps", "torch_encode_gbps", "torch_decode_gbps",
            "zfec_encode_gbps", "zfec_decode_gbps", "pyeclib_encode_gbps", "pyeclib_decode_gbps")),
            "n/a" if r["speedup_vs_zfec"] is None else f"{r['speedup_vs_zfec']:.1f}x"]))
    kernels = measure_kernels(4, 2, args.mib << 20, args.repeats) if args.kernels else None
    if kernels:
        print("k=4, m=2 encode into reused out, per native kernel: "
              + ", ".join(f"{name} {gbps:.2f}" for name, gbps in kernels.items()))
    if head["speedup_vs_zfec"] is not None:
        anchor, speedup = "zfec", head["speedup_vs_zfec"]
    else:
        anchor, speedup = "phalanx torch path (zfec not installed)", head["encode_gbps"] / head["torch_encode_gbps"]
        print("erasure: zfec is not installed (`pip install zfec`); speedup is against phalanx's torch path",
              file=sys.stderr)
    summary = {"bench": "erasure", "anchor": anchor, "speedup": speedup,
               **{key: head[key] for key in head if key not in ("k", "m")},
               "k": head["k"], "m": head["m"], "configs": rows, "kernels": kernels, "mib": args.mib, "repeats": args.repeats,
               "device": f"cpu ({platform.machine()}, 1 thread)", "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
