"""Where a step's device time goes: one call under ``torch.profiler``,
summed by kind of kernel (shared by the training and embedding benchmarks)."""
from __future__ import annotations

import time


def sync(device: str) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def profile_step(fn, device: str, top: int = 25) -> dict:
    """One call of ``fn`` under ``torch.profiler``. On CUDA: the device time
    of the kernels (and copies) it ran, totals by kind, the top kernels and
    the top operators (their kernels' time, under the operator that launched
    them); on the CPU the operators' own CPU time. Each with its calls and
    share of the step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    wall = time.perf_counter() - t

    def self_us(e) -> float:
        if cuda:
            return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)
        return float(e.self_cpu_time_total)

    averages = [e for e in prof.key_averages() if self_us(e) > 0]
    # on CUDA an operator's self device time is its kernels' time: count kernels only, or it counts twice
    kernels = [e for e in averages if not cuda or e.device_type != DeviceType.CPU]
    ops = [e for e in averages if cuda and e.device_type == DeviceType.CPU]
    total = sum(self_us(e) for e in kernels) or 1.0
    kinds = {"attention": ("attention", "fmha", "flash", "sdpa", "efficient"),
             "4-bit dequantize": ("dequant", "bitsandbytes"),
             "loss/softmax": ("softmax", "cross_entropy", "nll", "log_softmax"),
             "matmul": ("gemm", "matmul", "nvjet", "aten::mm", "aten::addmm", "aten::bmm", "cublas", "cutlass",
                        "xmma", "sm90_xmma")}
    by_kind = {k: 0.0 for k in kinds}
    for e in kernels:
        name = e.key.lower()
        kind = next((k for k, words in kinds.items() if any(w in name for w in words)), None)
        if kind:
            by_kind[kind] += self_us(e)
    by_kind["other (elementwise, norms, copies, ...)"] = total - sum(by_kind.values())

    def rows(events: list) -> list[dict]:
        return [{"name": e.key[:120], "calls": e.count, "ms": round(self_us(e) / 1000, 3),
                 "share": round(self_us(e) / total, 4)} for e in sorted(events, key=self_us, reverse=True)[:top]]

    out = {"wall_s": round(wall, 4), "measured": "device time of kernels" if cuda else "CPU self time",
           "total_ms": round(total / 1000, 3),
           "by_kind_share": {k: round(v / total, 4) for k, v in by_kind.items()}, "top": rows(kernels)}
    if cuda:
        out["top_ops"] = rows(ops)
    return out
