"""GPU checks of the MoE layer before it is timed (run by benchmarks/gpu/run_moe.sh on a CUDA machine).

1. `torch._grouped_mm` through phalanx's `GroupedMM` autograd (row-major and transposed weights) equals
   a per-expert loop in bf16, forward and backward.
2. The MoE layer on CUDA: grouped_mm kernel (bf16 autocast) against the loop kernel in bf16 (must agree
   to rounding) and in fp32 (reported), and the fp32 loop kernel against the per-token reference of
   tests/models/test_moe.py.
Prints one JSON line per check and, last, {"grouped_mm_ok": bool} for the script to choose the kernel.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def check_grouped_mm(device: torch.device) -> dict:
    from phalanx.models.experts import GroupedMM

    torch.manual_seed(0)
    E, M, d, F = 8, 4096, 1024, 704
    counts = torch.randint(0, 2 * M // E, (E,), device=device)
    counts[3] = 0  # an idle expert
    offsets = counts.cumsum(0).to(torch.int32)
    rows = int(offsets[-1])
    out = {}
    for layout in ("row_major", "transposed"):
        x = torch.randn(rows, d, device=device, dtype=torch.bfloat16, requires_grad=True)
        if layout == "row_major":
            w = torch.randn(E, d, F, device=device, dtype=torch.bfloat16).div_(d ** 0.5).requires_grad_()
            w_used = w
        else:
            w = torch.randn(E, F, d, device=device, dtype=torch.bfloat16).div_(d ** 0.5).requires_grad_()
            w_used = w.transpose(-2, -1)
        g = torch.randn(rows, F, device=device, dtype=torch.bfloat16)
        try:
            y = GroupedMM.apply(x, w_used, offsets)
            (y.float() * g.float()).sum().backward()
            got = (y.detach(), x.grad.clone(), w.grad.clone())
            x.grad, w.grad = None, None
            ys = [xs.float() @ w_used[e].float() for e, xs in enumerate(x.split(counts.tolist()))]
            ref_y = torch.cat(ys)
            (ref_y * g.float()).sum().backward()
            out[layout] = {"y": rel_err(got[0], ref_y), "dx": rel_err(got[1], x.grad), "dw": rel_err(got[2], w.grad),
                           "idle_dw_zero": bool(got[2][3].abs().sum() == 0)}
        except Exception as err:  # report and go on: the script falls back to the loop kernel
            out[layout] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
            traceback.print_exc()
    return out


def check_layer(device: torch.device) -> dict:
    from phalanx.config import ModelConfig, MoEConfig
    from phalanx.models.moe import MoE
    from tests.models.test_moe import per_token_reference

    torch.manual_seed(0)
    out = {}
    # fp32 loop kernel against the per-token reference (small: the reference loops in Python)
    cfg = ModelConfig(d_model=64, n_heads=4, moe=MoEConfig(num_experts=8, top_k=2, ffn_dim=96, kernel="loop"))
    layer = MoE(cfg).to(device)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(2, 16, 64, device=device)
    out["loop_fp32_vs_per_token"] = rel_err(layer(x), per_token_reference(layer, x))
    # grouped_mm in bf16 against the loop kernel in fp32: output and router/expert gradients
    cfg = ModelConfig(d_model=1024, n_heads=8, moe=MoEConfig(num_experts=8, top_k=2, ffn_dim=704))
    layer = MoE(cfg).to(device)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
    x = torch.randn(4, 512, 1024, device=device)
    results = {}
    for name, kernel, autocast in (("loop", "loop", False), ("loop_bf16", "loop", True),
                                   ("grouped_mm", "grouped_mm", True)):
        layer.experts.kernel = kernel
        layer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
        y.float().square().mean().backward()
        results[name] = (y.detach().float(), {n: p.grad.clone() for n, p in layer.named_parameters()})
    for name, ref in (("grouped_bf16_vs_loop_bf16", "loop_bf16"), ("grouped_bf16_vs_loop_fp32", "loop")):
        out[name] = {"y": rel_err(results["grouped_mm"][0], results[ref][0]),
                     **{n: rel_err(results["grouped_mm"][1][n], g) for n, g in results[ref][1].items()}}
    return out


def main() -> None:
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")  # cpu: a dry run of the script
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(json.dumps({"device": name, "torch": torch.__version__}), flush=True)
    gm = check_grouped_mm(device)
    print(json.dumps({"grouped_mm": gm}), flush=True)
    ok = "error" not in gm.get("row_major", {}) and all(v < 2e-2 for k, v in gm["row_major"].items() if k != "idle_dw_zero")
    layer = {}
    try:
        layer = check_layer(device)
    except Exception as err:
        layer = {"error": f"{type(err).__name__}: {err}"}
        traceback.print_exc()
        ok = False
    print(json.dumps({"layer": layer}), flush=True)
    if "grouped_bf16_vs_loop_bf16" in layer:  # same precision, other kernel: must agree to bf16 rounding
        ok = ok and all(v < 2e-2 for v in layer["grouped_bf16_vs_loop_bf16"].values())
    print(json.dumps({"grouped_mm_ok": bool(ok)}), flush=True)


if __name__ == "__main__":
    main()
