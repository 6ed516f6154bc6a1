"""One process vs two CPU processes (torch.distributed, gloo on loopback): identical results.

``accelerate launch --cpu --num_processes 2`` ran a single process on these machines, so the test
spawns the two ranks itself; torchmetrics syncs the registered states the same way either way.
The split is interleaved (rank r gets images r, r+2, ...), as a DistributedSampler would do.
"""

import json
import socket

import pytest
import torch.multiprocessing as mp
from _metrics_helpers import canvases

from harness.metrics.cluster_kl import ClusterKL
from harness.metrics.features import ModuleExtractor
from harness.metrics.fid import CMMD, FID, KID


def _metrics():
    from _metrics_helpers import ColorStats, PoolNet, shape_detector

    ext = ModuleExtractor(PoolNet(), input_size=16)
    return {
        "fid": FID(ext), "kid": KID(ext, subsets=10, subset_size=20), "cmmd": CMMD(ext),
        "cluster_kl": ClusterKL(shape_detector, ModuleExtractor(ColorStats(), input_size=16), seed=0),
    }


def _data():
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (30, 3, 16, 16), generator=g, dtype=torch.uint8)
    b = (torch.randint(0, 256, (30, 3, 16, 16), generator=g) * 0.7).to(torch.uint8)
    return a, b, canvases(12, 1), canvases(12, 2, planted=0.5)


def _run(rank: int, world: int) -> dict:
    a, b, od, tm = _data()
    ms = _metrics()
    for i in range(rank, len(a), world * 4):  # batches of 4 images, interleaved over ranks
        idx = [j for j in range(i, min(i + world * 4, len(a)), world)]
        for name in ("fid", "kid", "cmmd"):
            ms[name].update(a[idx], real=True)
            ms[name].update(b[idx], real=False)
    ms["cluster_kl"].update(od[rank::world], "od")
    ms["cluster_kl"].update(tm[rank::world], "tm")
    out = {"fid": float(ms["fid"].compute()), "kid": float(ms["kid"].compute()[0]), "cmmd": float(ms["cmmd"].compute())}
    ck = ms["cluster_kl"].compute()
    out.update(kl=ck["kl_od_tm"], js=ck["js_od_tm"], n_crops=ck["n_crops"])
    out["fid_ci"] = ms["fid"].compute_ci(n_boot=10)["ci_high"]
    return out


def _worker(rank, world, port, out_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        res = _run(rank, world)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(res, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_one_process_and_two_processes_agree(tmp_path):
    single = _run(0, 1)
    out = tmp_path / "two.json"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    two = json.loads(out.read_text())
    assert two["n_crops"] == single["n_crops"] == {"od": 24, "bm": 0, "tm": 24}
    for key in ("fid", "kid", "cmmd", "kl", "js", "fid_ci"):
        assert two[key] == pytest.approx(single[key], rel=1e-6, abs=1e-9), key
    assert single["kl"] > 0 and single["fid"] > 0
