"""Cost of every zoo model and architecture: parameters, GFLOP per megapixel, CPU seconds per
1024 x 1024 (2 threads, inference mode), GPU milliseconds when CUDA is available.

    python benchmarks/bench_models.py             # full table (several minutes on 2 cores)
    python benchmarks/bench_models.py --size 256  # quicker: times scaled to 1 MP
    python benchmarks/bench_models.py --no-time   # parameters and FLOPs only

Burst models are measured on 5-frame bursts; GFLOP/MP is per megapixel of the input frame
(torch's FlopCounterMode, a multiply-add = 2 FLOPs). Times are the median of --repeat runs
after one warm-up, of the network alone (registration is benchmarked separately).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from napari_microrestore.models import ARCHITECTURES, build
from napari_microrestore.models._flops import count_parameters, gflops_per_megapixel
from napari_microrestore.models.zoo import list_cards

BURST_ARCHS = {"burst-unet", "burst-dense-unet", "burst-fast"}


def example(arch: str, kwargs: dict, size: int, frames: int = 5) -> torch.Tensor:
    if arch in BURST_ARCHS:
        return torch.randn(1, frames, 1, size, size)
    if arch == "deblurgan-v2":
        return torch.randn(1, kwargs.get("in_channels", 3), size, size)
    if arch == "section-restorer":
        x = torch.randn(1, 4, size, size)
        x[:, 3] = 1.0  # a missing section: the mask channel is all ones
        return x
    return torch.randn(1, 1, size, size)


def timed(net, x, repeat: int, device: str) -> float:
    with torch.inference_mode():
        net(x)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        ts = []
        for _ in range(repeat):
            t = time.perf_counter()
            net(x)
            if device == "cuda":
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="frame edge for timing (default 1024)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-time", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()

    entries = [(c.id, c.architecture, c.kwargs) for c in list_cards() if not c.is_classical]
    entries += [(f"({a} defaults)", a, {}) for a in ARCHITECTURES]
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} CPU threads, timing size {args.size}x{args.size}"
          + (f", GPU {torch.cuda.get_device_name()}" if cuda else ", no GPU"))
    print()
    cols = ["model", "architecture", "parameters", "GFLOP/MP", "CPU s / 1024^2"]
    if cuda:
        cols.append("GPU ms / 1024^2 (fp16)")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for name, arch, kwargs in entries:
        net = build(arch, kwargs).eval()
        mult = getattr(net, "multiple", 1)
        flops_size = max(64, 256 // mult * mult)
        g = gflops_per_megapixel(net, example(arch, kwargs, flops_size))
        row = [name, arch, f"{count_parameters(net) / 1e6:.2f} M", f"{g:.0f}"]
        scale = (1024 / args.size) ** 2
        if args.no_time:
            row.append("-")
        else:
            size = args.size // mult * mult
            row.append(f"{timed(net, example(arch, kwargs, size), args.repeat, 'cpu') * scale:.2f}")
        if cuda:
            netg = net.to("cuda").half()
            x = example(arch, kwargs, 1024 // mult * mult).to("cuda").half()
            row.append(f"{timed(netg, x, max(args.repeat, 10), 'cuda') * 1e3:.1f}")
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
