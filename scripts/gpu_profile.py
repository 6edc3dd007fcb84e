"""Where a quantized linear's time goes on a GPU: host-side time per call (launching the
kernels) against the time with the GPU work waited for, and the top operators by host time.

    python scripts/gpu_profile.py [OUT.txt]      # run by scripts/gpu-checks.sh

W8A8 and MASQuant (rank 32, half of the tokens vision) at 4096 x 4096, 16 and 512 tokens,
next to FP32 ``nn.Linear``. When host time per call is about the time with the GPU, the path
is launch-bound: the GPU waits for Python and the dispatcher, not the other way round."""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from masquant.modality import Modality, ModalityRouter
from masquant.bench.speed import quant_linear


def _per_call(fn, calls: int = 50) -> tuple[float, float]:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls
    torch.cuda.synchronize()
    return host, (time.perf_counter() - start) / calls


def main(out: str | None = None) -> None:
    torch.manual_seed(0)
    fp = torch.nn.Linear(4096, 4096)
    router = ModalityRouter({})
    variants = {"fp32": fp.cuda(), "W8A8": quant_linear(fp, 8).cuda(),
                "MASQuant W8A8 r32": quant_linear(fp, 8, rank=32, router=router).cuda()}
    lines = [f"{torch.cuda.get_device_name()} | torch {torch.__version__}"]
    for m in (16, 512):
        x = torch.randn(m, 4096, device="cuda")
        ids = torch.zeros(m, dtype=torch.long, device="cuda")
        ids[m // 2:] = int(Modality.VISION)
        with router.scope(ids), torch.no_grad():
            for name, layer in variants.items():
                host, total = _per_call(lambda layer=layer, x=x: layer(x))
                lines.append(f"{m} tokens, {name}: host {host * 1e6:.0f} us/call, "
                             f"with the GPU {total * 1e6:.0f} us/call")
                if name == "fp32":
                    continue
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(10):
                        layer(x)
                    torch.cuda.synchronize()
                lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
