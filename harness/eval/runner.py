"""``harness eval``: generate what a suite asks for every checkpoint, score it, gate it.

Phases (each with its own progress bar on the main process):

1. plan: read the suite, resolve prompts/references/checkpoints, check the run folder (a folder of
   another suite version is refused), write run.json / suite.yaml / prompts.jsonl;
2. generate: images, grids and x-ray traces. Under ``accelerate launch`` / ``torchrun`` the work is
   cut into fixed batches (the same batches whatever the process count) dealt round-robin to the
   processes, so N processes make exactly the images one process makes. Finished images are skipped
   on a rerun (resume);
3. score (main process, from the files on disk): every metric with intervals, verdicts, gates;
   results.json + results.csv/parquet. The report stage renders report.html from them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.config import dump_yaml
from harness.errors import HarnessError
from harness.eval import layout, plan
from harness.eval.suite import Suite, check_extractors, load_suite, suite_identity
from harness.eval.verdict import GateResult
from harness.io import atomic_write_json, atomic_write_text
from harness.lock import run_lock

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    run_dir: Path
    results: dict | None  # None on processes other than the main one
    failed: list[GateResult] = field(default_factory=list)
    generated: int = 0
    skipped: int = 0
    report: Path | None = None  # set by harness.report.evaluate when it renders the run
    not_evaluated: list[GateResult] = field(default_factory=list)  # gates on a metric with no value

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def _state(device: str | None):
    """accelerate's view of the launch (``accelerate launch`` / ``torchrun`` set the environment).
    On a machine without CUDA, or with ``--device cpu``, it must be told so to form a CPU (gloo) group."""
    import torch
    from accelerate import PartialState

    cpu = (device or "").startswith("cpu") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def _leave_group(state) -> None:
    """After generation only the main process works on: metrics must not try to sync with processes
    that have exited (torchmetrics syncs whenever a process group exists)."""
    import torch.distributed as dist

    if state.num_processes > 1 and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _barrier(state) -> None:
    if state.num_processes > 1:
        state.wait_for_everyone()


def run_eval(suite_path: str | Path, *, base: str, candidates: Sequence[str], out: str | Path,
             data: str | Path | None = None, overrides: Sequence[str] = (), device: str | None = None,
             allow_pickle: bool = False, progress: bool = True) -> EvalResult:
    """Run a suite; see the module docstring. Returns the results (main process) and failed gates.

    Rendering is the report stage's: ``harness.report.evaluate.run_eval`` runs this, then writes
    ``report.html``."""
    state = _state(device)
    main = state.is_main_process
    # "cpu", not accelerate's "cpu:0": ultralytics refuses the latter
    device = device or ("cpu" if state.device.type == "cpu" else str(state.device))
    run_dir = Path(out)
    suite = load_suite(suite_path, list(overrides))
    check_extractors(suite, str(suite_path))  # an extractor that cannot load fails now, not after generating
    identity = suite_identity(suite, suite_path)
    items = plan.prompt_items(suite, suite_path, data)
    ckpts = plan.checkpoints(base, list(candidates), allow_pickle=allow_pickle)
    # one writer per run folder; the other processes of this run write under the main one's lock
    with run_lock(run_dir, "harness eval") if main else contextlib.nullcontext():
        return _run(run_dir, suite, suite_path, identity, ckpts, items, data, state, device, allow_pickle, progress)


def _run(run_dir, suite, suite_path, identity, ckpts, items, data, state, device, allow_pickle, progress):
    main = state.is_main_process
    if main:
        ckpts = plan.with_hashes(ckpts)
        plan.check_run_dir(run_dir, identity, ckpts)  # refuses a folder of another suite or checkpoint
        _write_plan(run_dir, suite, identity, ckpts, items, data)
    _barrier(state)

    counts = generate_all(run_dir, suite, ckpts, items, rank=state.process_index, world=state.num_processes,
                          device=device, allow_pickle=allow_pickle, progress=progress and main)
    _barrier(state)
    _leave_group(state)
    if not main:
        return EvalResult(run_dir, None, generated=counts["generated"], skipped=counts["skipped"])

    results, per_image = score_all(run_dir, suite, suite_path, ckpts, items, data, device=device, progress=progress,
                                   allow_pickle=allow_pickle)
    write_results(run_dir, results, per_image)
    gates = [GateResult(**g) for g in results["gates"]]
    failed = [g for g in gates if g.evaluated and not g.passed]
    return EvalResult(run_dir, results, failed, counts["generated"], counts["skipped"],
                      not_evaluated=[g for g in gates if not g.evaluated])


# --- plan ------------------------------------------------------------------------------------

def _write_plan(run_dir: Path, suite: Suite, identity: dict, ckpts, items, data) -> None:
    from harness.config import to_dict
    from harness.provenance import record

    run = {
        "schema": layout.RUN_SCHEMA, "suite": identity, "suite_config": to_dict(suite),
        "checkpoints": [asdict(c) for c in ckpts],
        "data": str(Path(data).resolve()) if data is not None else None, "seeds": list(suite.seeds),
        "generation": to_dict(suite.generation), "n_items": len(items),
        "provenance": record(kind="eval"),
    }
    atomic_write_json(run_dir / layout.RUN, run)
    atomic_write_text(run_dir / layout.SUITE, dump_yaml(suite))
    atomic_write_text(run_dir / layout.PROMPTS, "".join(json.dumps(asdict(it)) + "\n" for it in items))


# --- generate --------------------------------------------------------------------------------

def _dtype(suite: Suite, device: str):
    import torch

    want = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[suite.generation.dtype]
    if want != torch.float32 and not str(device).startswith("cuda"):
        log.warning("generation.dtype=%s on %s: using fp32 (half precision is slow or unsupported off the GPU)",
                    suite.generation.dtype, device)
        return torch.float32
    return want


def image_jobs(suite: Suite, ckpt: plan.Checkpoint, items: Sequence[plan.Item]) -> list:
    from harness.generate.batch import Job, make_params

    g = suite.generation
    return [Job(make_params(ckpt.source, it.prompt, it.seed, negative_prompt=g.negative_prompt,
                            guidance_scale=g.cfg, steps=g.steps, scheduler=g.scheduler, width=g.width,
                            height=g.height), it.file()) for it in items]


def _jsonl_name(rank: int) -> str:
    from harness.generate.batch import JSONL

    # one file per process: concurrent appends to one file could interleave
    return JSONL if rank == 0 else JSONL.replace(".jsonl", f".rank{rank}.jsonl")


def generate_all(run_dir: Path, suite: Suite, ckpts, items, *, rank: int = 0, world: int = 1, device: str = "cpu",
                 allow_pickle: bool = False, progress: bool = True) -> dict:
    """This process's share of the images, grids and x-ray traces (resumable)."""
    from harness.generate.batch import run_jobs
    from harness.generate.pipes import PipelineCache
    from harness.progress import Progress

    dtype = _dtype(suite, device)
    cache = PipelineCache(device=device, dtype=dtype, allow_pickle=allow_pickle)
    bs = suite.generation.batch_size
    # Fixed batches, dealt round-robin: the batch composition (and so every image, bit for bit) does
    # not depend on the number of processes.
    batches = []
    for ck in ckpts:
        jobs = image_jobs(suite, ck, items)
        batches += [(ck, jobs[i:i + bs]) for i in range(0, len(jobs), bs)]
    mine = batches[rank::world]
    counts = {"generated": 0, "skipped": 0}
    bar = Progress(total=sum(len(b) for _, b in mine), desc="generate", unit="img", disable=not progress)
    for ck, jobs in mine:
        c = run_jobs(jobs, run_dir / layout.IMAGES / ck.label, batch_size=bs, device=device, dtype=dtype,
                     allow_pickle=allow_pickle, progress=False, jsonl=_jsonl_name(rank), cache=cache)
        counts["generated"] += c["generated"]
        counts["skipped"] += c["skipped"]
        bar.update(len(jobs))
    bar.close()
    if counts["skipped"]:
        log.info("reused %d images already generated in %s", counts["skipped"], run_dir)
    extra = [("grid", ck, g) for ck in ckpts for g in suite.grids]
    extra += [("xray", ck, i) for ck in ckpts for i in range(min(suite.xray.samples, _first_set_size(items)))]
    bar = Progress(total=len(extra[rank::world]), desc="grids+xray", disable=not progress or not extra)
    for kind, ck, what in extra[rank::world]:
        if kind == "grid":
            _grid(run_dir, suite, ck, what, device=device, dtype=dtype, allow_pickle=allow_pickle)
        else:
            _xray(run_dir, suite, ck, items, what, device=device, dtype=dtype, cache=cache)
        bar.update(1)
    bar.close()
    return counts


def _first_set_size(items) -> int:
    first = items[0].subset if items else None
    return len({it.index for it in items if it.subset == first})


def _grid(run_dir: Path, suite: Suite, ck, g, *, device, dtype, allow_pickle) -> dict:
    from harness.generate.grid import GridSpec, run_grid

    gen = suite.generation
    spec = GridSpec(checkpoint=ck.source, prompt=g.prompt, x=g.x, y=g.y or "", z=g.z or "",
                    negative_prompt=gen.negative_prompt, seeds=tuple(g.seeds), cfg=gen.cfg, steps=gen.steps,
                    scheduler=gen.scheduler, width=gen.width, height=gen.height, batch_size=gen.batch_size,
                    max_cells=10_000)
    out = run_dir / layout.GRIDS / ck.label / g.name
    if (out / "grid.json").is_file():
        return json.loads((out / "grid.json").read_text())
    return run_grid(spec, out, device=device, dtype=dtype, allow_pickle=allow_pickle, progress=False)


def _xray(run_dir: Path, suite: Suite, ck, items, index: int, *, device, dtype, cache) -> None:
    from harness.generate.xray import xray

    first = items[0].subset
    it = next(i for i in items if i.subset == first and i.index == index)
    out = run_dir / layout.XRAY / ck.label / f"{index:03d}"
    if (out / f"xray_s{it.seed}.json").is_file():
        return
    gen = suite.generation
    xray(cache.get(ck.source), it.prompt, out=out, seeds=(it.seed,), steps=gen.steps, guidance_scale=gen.cfg,
         negative_prompt=gen.negative_prompt, scheduler=gen.scheduler, width=gen.width, height=gen.height,
         vae_every=suite.xray.vae_every, checkpoint=ck.source)


# --- score -----------------------------------------------------------------------------------

def per_image_records(run_dir: Path, ckpts, items) -> list[dict]:
    from harness.generate.batch import read_png_params

    out = []
    for ck in ckpts:
        folder = run_dir / layout.IMAGES / ck.label
        for it in items:
            path = folder / it.file()
            meta = read_png_params(path) if path.is_file() else None
            finite = bool(meta.get("finite", True)) if meta else False
            out.append({"checkpoint": ck.label, "subset": it.subset, "index": it.index, "seed": it.seed,
                        "prompt": it.prompt, "image": layout.rel(run_dir, path) if path.is_file() else None,
                        "reference": it.reference, "clip_score": None, "artifact_score": None, "heatmap": None,
                        "nonfinite": meta is not None and not finite})
    return out


def score_all(run_dir: Path, suite: Suite, suite_path, ckpts, items, data, *, device: str = "cpu",
              progress: bool = True, allow_pickle: bool = False) -> tuple[dict, list[dict]]:
    from harness.eval import gates, scoring
    from harness.eval.suite import metric_class

    per_image = per_image_records(run_dir, ckpts, items)
    missing = [r for r in per_image if r["image"] is None]
    if missing:
        raise HarnessError(f"{run_dir}: {len(missing)} generated images are missing (first: {missing[0]['checkpoint']}"
                           f"/{missing[0]['subset']} #{missing[0]['index']} seed {missing[0]['seed']}); rerun to resume")
    sc = scoring.Scoring(run_dir=run_dir, suite=suite, ckpts=ckpts, items=items, per_image=per_image,
                         reference=plan.reference_files(suite, suite_path, data), cache_dir=run_dir / layout.CACHE,
                         device=device, progress=progress, allow_pickle=allow_pickle)
    bad = sum(r["nonfinite"] for r in per_image)
    if bad:
        sc.notes.append(f"{bad} generated image(s) had NaN/Inf latents: marked in the report and left out of "
                        "every metric")
    from harness.progress import Progress

    bar = Progress(total=len(suite.metrics) + 1, desc="score", disable=not progress)
    for label, spec in suite.metrics.items():
        name = suite.metric_name(label)
        bar.set_postfix_str(label)
        scoring.compute(sc, label, name, metric_class(name), dict(spec.settings), suite.subsets_of(label),
                        optional=spec.optional)
        bar.update(1)
    bar.set_postfix_str("grid surfaces")
    surfaces = scoring.surfaces(sc, _grid_records(run_dir, suite, ckpts))
    bar.update(1)
    bar.close()
    gate_results, gate_notes = gates.evaluate(suite, sc.rows, ckpts)
    sc.notes.extend(gate_notes)
    from harness.provenance import record

    results = {
        "schema": layout.RESULTS_SCHEMA, "suite": suite_identity(suite, suite_path),
        "checkpoints": [asdict(c) for c in ckpts], "rows": sc.rows, "breakdowns": sc.breakdowns,
        "surfaces": surfaces, "grids": _grid_pages(run_dir, suite, ckpts), "xray": _xray_records(run_dir, ckpts, items),
        "gates": [asdict(g) for g in gate_results], "gates_passed": _gates_passed(gate_results),
        "notes": sc.notes, "counts": {"images": len(per_image), "reference": len(sc.reference), "nonfinite": bad},
        "provenance": record(kind="eval", seeds=list(suite.seeds), device=device),
    }
    return results, per_image


def _gates_passed(gates: list[GateResult]) -> bool | None:
    """True / False over the gates that could be evaluated; None when there are none (no gates, or
    none with a value), so nothing claims "all passed" without a check behind it."""
    done = [g for g in gates if g.evaluated]
    return all(g.passed for g in done) if done else None


def _grid_records(run_dir: Path, suite: Suite, ckpts) -> list[tuple[str, str, dict, Path]]:
    out = []
    for g in suite.grids:
        for ck in ckpts:
            folder = run_dir / layout.GRIDS / ck.label / g.name
            if (folder / "grid.json").is_file():
                out.append((g.name, ck.label, json.loads((folder / "grid.json").read_text()), folder))
    return out


def _grid_pages(run_dir: Path, suite: Suite, ckpts) -> list[dict]:
    out = []
    for name, label, data, folder in _grid_records(run_dir, suite, ckpts):
        axes = data.get("axes", {})
        names = [f"{k}: {a['name']}" for k, a in axes.items() if a]
        pages = [layout.rel(run_dir, folder / p["file"]) for p in data.get("pages", [])]
        if data.get("overview"):
            pages.append(layout.rel(run_dir, folder / data["overview"]))
        out.append({"name": name, "checkpoint": label, "pages": pages,
                    "caption": f"prompt: {data.get('fixed', {}).get('prompt', '')} — " + ", ".join(names)})
    return out


def _xray_records(run_dir: Path, ckpts, items) -> list[dict]:
    out = []
    for ck in ckpts:
        root = run_dir / layout.XRAY / ck.label
        for trace_path in sorted(root.glob("*/xray_s*.json")) if root.is_dir() else []:
            trace = json.loads(trace_path.read_text())
            strip = trace_path.parent / trace["strip"] if trace.get("strip") else None
            params = trace.get("params", {})
            out.append({"checkpoint": ck.label, "prompt": params.get("prompt", ""), "seed": params.get("seed"),
                        "strip": layout.rel(run_dir, strip) if strip else None, "stats": _trace_stats(trace),
                        "finite": trace.get("finite", True)})
    return out


def _trace_stats(trace: dict) -> dict:
    """Per-step series for the report's plot: std of the latent, the noise estimate and predicted x0."""
    steps = trace.get("steps") or []
    stats: dict[str, list] = {}
    for key in ("latent", "noise_pred", "pred_x0"):
        vals = [(s.get(key) or {}).get("std") for s in steps]
        if any(isinstance(v, (int, float)) for v in vals):
            stats[f"{key} std"] = [v if isinstance(v, (int, float)) else math.nan for v in vals]
    return stats


def write_results(run_dir: Path, results: dict, per_image: list[dict]) -> None:
    import pandas as pd

    atomic_write_text(run_dir / layout.PER_IMAGE, "".join(json.dumps(r) + "\n" for r in per_image))
    atomic_write_json(run_dir / layout.RESULTS, results)
    df = pd.DataFrame(results["rows"], columns=list(layout.TABLE_COLUMNS))
    atomic_write_text(run_dir / layout.TABLE_CSV, df.to_csv(index=False))
    from harness.io import atomic_write

    atomic_write(run_dir / layout.TABLE_PARQUET, lambda f: df.to_parquet(f, index=False))


