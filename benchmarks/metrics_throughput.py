"""Feature-extraction throughput and memory growth of harness FID/KID vs torchmetrics' FID.

Each (implementation, image count) runs in a fresh process: images are generated batch by batch
(so they never sit in memory), fed to the metric, then ``compute()``. Reported: images/s and the
growth of peak RSS over the process's baseline after a warm-up batch. Memory of a running-sum FID
should stay flat as the count grows; feature-keeping metrics (KID, FID's interval reservoir) grow
until their cap. Same tiny extractor (a conv net, uint8 [N,3,32,32] -> [N,64]) for all rows.

    python benchmarks/metrics_throughput.py [--counts 256 1024 4096] [--batch 64]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

IMPLS = ("torchmetrics_fid", "harness_fid", "harness_fid_ci", "harness_kid", "harness_fid_resize")


def _net():
    import torch

    torch.manual_seed(0)

    class TinyConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(
                torch.nn.Conv2d(3, 32, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, 2, 1), torch.nn.ReLU(),
                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

        def forward(self, x):
            return self.body(x.float() / 255)

    return TinyConv().eval()


def _metric(impl: str):
    if impl == "torchmetrics_fid":
        from torchmetrics.image.fid import FrechetInceptionDistance

        return FrechetInceptionDistance(feature=_net(), input_img_size=(3, 32, 32))
    from harness.metrics.features import ModuleExtractor
    from harness.metrics.fid import FID, KID

    ext = ModuleExtractor(_net(), input_size=32)
    if impl in ("harness_fid", "harness_fid_resize"):
        return FID(ext, ci_samples=0)
    if impl == "harness_fid_ci":
        return FID(ext)  # default interval reservoir (5000 features per side, float16)
    return KID(ext, subsets=10, subset_size=500)


def _one(impl: str, n: int, batch: int) -> tuple[float, float]:
    import torch

    torch.set_num_threads(1)
    size = 64 if impl == "harness_fid_resize" else 32  # resize row: 64 px images through the PIL path
    metric = _metric(impl)
    g = torch.Generator().manual_seed(0)

    def batches(count):
        for i in range(0, count, batch):
            yield torch.randint(0, 256, (min(batch, count - i), 3, size, size), generator=g, dtype=torch.uint8)

    for x in batches(batch):  # warm-up, then the baseline
        metric.update(x, real=True)
    metric.reset()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    for real in (True, False):
        for x in batches(n):
            metric.update(x, real=real)
    elapsed = time.perf_counter() - t
    metric.compute()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return 2 * n / elapsed, (peak - base) / 1024  # images/s, MiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--counts", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    rows = {}
    for n in args.counts:
        for impl in args.impls:
            with ctx.Pool(1) as pool:
                rows[(impl, n)] = pool.apply(_one, (impl, n, args.batch))
    print(f"\nimages per set (x2 sets), batch {args.batch}, 1 thread; memory = peak RSS growth after warm-up")
    print(f"{'implementation':<20}{'images':>8}{'img/s':>10}{'vs tm':>8}{'mem MiB':>10}")
    for n in args.counts:
        ref = rows.get(("torchmetrics_fid", n), (None,))[0]
        for impl in args.impls:
            ips, mem = rows[(impl, n)]
            ratio = f"{ips / ref:.2f}x" if ref else "-"
            print(f"{impl:<20}{n:>8}{ips:>10.0f}{ratio:>8}{mem:>10.1f}")


if __name__ == "__main__":
    main()
