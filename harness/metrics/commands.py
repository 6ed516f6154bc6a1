"""``harness score METRIC DIR_A [DIR_B]``: one metric between image folders, with its interval."""

from __future__ import annotations

import json

from harness.metrics.registry import METRICS


def add_arguments(p) -> None:
    p.add_argument("metric", help=f"one of: {', '.join(sorted(METRICS))}")
    p.add_argument("dir_a", help="reference folder (A; OD for cluster_kl; the scored folder for clip_score)")
    p.add_argument("dir_b", nargs="?", help="compared folder (B; TM for cluster_kl)")
    p.add_argument("--extractor", help="inception | clip:MODEL_OR_PATH | dinov2:MODEL_OR_PATH "
                   "(clip_score: clip:... or hf:...; cluster_kl: the crop embedder, or 'detector' for the "
                   "detector's own features)")
    p.add_argument("--prompts", help="clip_score: .txt (one line per image, sorted names) or .json/.jsonl")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--n-boot", type=int, default=None, help="bootstrap resamples for the interval")
    p.add_argument("--alpha", type=float, default=0.05, help="1 - confidence level (default 0.05)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", help="set metrics: cache features here (.npz keyed by images and extractor)")
    g = p.add_argument_group("cluster_kl")
    g.add_argument("--detector", help="zoo folder, .yaml or .pt (ultralytics) detector")
    g.add_argument("--bm", help="base-model images folder (adds KL(BM||TM))")
    g.add_argument("--conf", type=float, default=0.25, help="detection confidence threshold")
    g.add_argument("--allow-pickle", action="store_true", help="allow loading a pickled .pt detector")


def _kwargs(args) -> dict:
    kw = {"alpha": args.alpha, "seed": args.seed, "device": args.device}
    if args.n_boot is not None:
        kw["n_boot"] = args.n_boot
    if args.batch_size is not None:
        kw["batch_size"] = args.batch_size
    if args.metric == "cluster_kl":
        from harness.errors import HarnessError

        if not args.detector:
            raise HarnessError("cluster_kl: needs --detector (a zoo folder, .yaml or .pt)")
        kw.update(detector=args.detector, bm=args.bm, conf=args.conf, allow_pickle=args.allow_pickle)
    elif args.metric != "clip_score" and args.cache_dir:
        kw["cache_dir"] = args.cache_dir
    return kw


def _fmt(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return "n/a" if v is None else f"{v:.6g}"


def run(args) -> int:
    from harness.metrics.score import score
    from harness.provenance import record

    res = score(args.metric, args.dir_a, args.dir_b, extractor=args.extractor, prompts=args.prompts, **_kwargs(args))
    res["provenance"] = record()
    if args.json:
        print(json.dumps(res, indent=2, default=str))
        return 0
    level = int(round(100 * (1 - args.alpha)))
    print(f"{args.metric} = {_fmt(res['value'])}  [{level}% CI {_fmt(res['ci_low'])} .. {_fmt(res['ci_high'])}]"
          f"  n_a={res['n_a']} n_b={res['n_b']}  extractor={res.get('extractor')}")
    for w in res.get("warnings", []):
        print(f"warning: {w}")
    return 0
