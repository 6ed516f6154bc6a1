"""x/y/z comparison grids: plan cells, generate them batched, draw labelled pages, write ``grid.json``.

Planning: every (z, y, x) cell resolves to a full parameter dict; each of the spec's seeds makes one
image of the cell (all kept, drawn side by side). Images run through :func:`harness.generate.batch.run_jobs`,
which groups them by checkpoint/scheduler/size/LoRA - so a CFG x seed x prompt x steps sweep shares
denoising batches and every checkpoint loads once, whatever axis it sits on.

Drawing (:mod:`harness.generate.grid_draw`): one grid per z value (paged when it would exceed
``max_grid_px`` on a side), plus an overview of all z grids. ``grid.json`` keeps every parameter and
every cell's pixel box, so the report can rebuild captions and crop cells::

    {"version": 1, "spec": {...GridSpec...}, "fixed": {params shared by all cells},
     "axes": {"x": {"name": "cfg", "values": [...], "labels": [...]} | null, "y": ..., "z": ...},
     "seeds": [1, 2],
     "cells": [{"x": 0, "y": 0, "z": 0, "params": {...no seed...},
                "images": [{"seed": 1, "file": "cells/z0_y0_x0_s1.png", "key": "..."}]}],
     "pages": [{"z": 0, "page": 0, "file": "grid_z0_p0.png", "rows": [0, 1], "cols": [0, 1, 2],
                "boxes": [{"x": 0, "y": 0, "seed": 1, "box": [left, top, right, bottom]}]}],
     "overview": "overview.png" | null, "counts": {...}, "provenance": {...}}
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.errors import ConfigError
from harness.generate.axes import Axis, check_axes, parse_axis
from harness.generate.batch import Job, job_key, make_params, run_jobs
from harness.generate.grid_draw import Layout, draw_grid, draw_overview, pages, save_image
from harness.io import atomic_write_json
from harness.models.lora_spec import is_spec, parse_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GridSpec:
    """A grid, from the command line or YAML (``harness grid --spec grid.yaml``)."""

    checkpoint: str = ""
    prompt: str = ""
    x: str = ""
    y: str = ""
    z: str = ""
    negative_prompt: str = ""
    seeds: tuple[int, ...] = (0,)
    cfg: float = field(default=7.5, metadata={"min": 0})
    steps: int = field(default=30, metadata={"min": 1, "max": 1000})
    scheduler: str | None = None
    width: int = field(default=512, metadata={"min": 8})
    height: int = field(default=512, metadata={"min": 8})
    lora: str | None = None
    lora_scale: float | None = None
    max_cells: int = field(default=100, metadata={"min": 1})
    batch_size: int = field(default=8, metadata={"min": 1})
    max_grid_px: int = field(default=4096, metadata={"min": 64})


@dataclass
class Cell:
    x: int
    y: int
    z: int
    params: dict  # without the seed
    jobs: list[Job]


@dataclass
class GridPlan:
    spec: GridSpec
    axes: dict[str, Axis | None]
    seeds: list[int]
    cells: list[Cell]

    @property
    def jobs(self) -> list[Job]:
        return [j for c in self.cells for j in c.jobs]

    def cell(self, x: int, y: int, z: int) -> Cell:
        return self._index[(x, y, z)]

    def __post_init__(self):
        self._index = {(c.x, c.y, c.z): c for c in self.cells}


def _axis(text: str) -> Axis | None:
    return parse_axis(text) if text and text.strip() else None


def plan_grid(spec: GridSpec) -> GridPlan:
    """Resolve axes into cells and jobs; refuse grids larger than ``spec.max_cells`` images."""
    axes = {k: _axis(getattr(spec, k)) for k in ("x", "y", "z")}
    present = [a for a in axes.values() if a is not None]
    check_axes(present)
    names = {a.name for a in present}
    seeds = [int(s) for s in spec.seeds]
    if "seed" in names:
        seeds = [None]  # the axis gives each cell its seed
    elif not seeds:
        raise ConfigError("seeds: give at least one seed")
    if is_spec(spec.checkpoint) and not spec.lora:  # BASE::LORA@SCALE: the LoRA's scale may be an axis
        m = parse_spec(spec.checkpoint)
        spec = dataclasses.replace(spec, checkpoint=m.base, lora=m.lora, lora_scale=m.scale if spec.lora_scale is None else spec.lora_scale)
    if "lora_scale" in names and not spec.lora:
        raise ConfigError("axis lora_scale needs LoRA weights: set lora (--lora)")
    if "checkpoint" not in names and not spec.checkpoint:
        raise ConfigError("checkpoint: give a checkpoint (--model) or a checkpoint axis")
    if "prompt" not in names and not spec.prompt:
        raise ConfigError("prompt: give a prompt (--prompt) or a prompt axis")
    sizes = {k: len(a) if a else 1 for k, a in axes.items()}
    n_images = sizes["x"] * sizes["y"] * sizes["z"] * len(seeds)
    if n_images > spec.max_cells:
        raise ConfigError(
            f"the grid has {n_images} images (x {sizes['x']} x y {sizes['y']} x z {sizes['z']} x {len(seeds)} "
            f"seeds), more than max_cells={spec.max_cells}; pass --max-cells {n_images} to confirm")
    base = {"checkpoint": spec.checkpoint, "prompt": spec.prompt, "negative_prompt": spec.negative_prompt,
            "guidance_scale": spec.cfg, "steps": spec.steps, "scheduler": spec.scheduler, "width": spec.width,
            "height": spec.height, "lora": spec.lora, "lora_scale": spec.lora_scale, "seed": seeds[0] or 0}
    cells = []
    for zi, yi, xi in itertools.product(range(sizes["z"]), range(sizes["y"]), range(sizes["x"])):
        p = dict(base)
        # prompt before prompt_sr, so a search/replace axis edits whichever prompt the cell has
        order = sorted(((k, a, i) for k, a, i in (("z", axes["z"], zi), ("y", axes["y"], yi), ("x", axes["x"], xi))
                        if a is not None), key=lambda t: t[1].name == "prompt_sr")
        for _k, a, i in order:
            p = a.apply(p, i)
        cell_seeds = [p["seed"]] if seeds == [None] else seeds
        jobs = []
        for s in cell_seeds:
            params = make_params(p["checkpoint"], p["prompt"], s, negative_prompt=p["negative_prompt"],
                                 guidance_scale=p["guidance_scale"], steps=p["steps"], scheduler=p["scheduler"],
                                 width=p["width"], height=p["height"], lora=p["lora"], lora_scale=p["lora_scale"])
            jobs.append(Job(params, f"cells/z{zi}_y{yi}_x{xi}_s{s}.png"))
        cell_params = {k: v for k, v in jobs[0].params.items() if k != "seed"}
        cells.append(Cell(x=xi, y=yi, z=zi, params=cell_params, jobs=jobs))
    return GridPlan(spec=spec, axes=axes, seeds=[j.params["seed"] for j in cells[0].jobs] if seeds != [None] else [],
                    cells=cells)


def ordered_jobs(plan: GridPlan) -> list[Job]:
    """Jobs ordered so checkpoint switches happen least, then scheduler switches."""
    jobs = plan.jobs
    first: dict[tuple, int] = {}
    for j in jobs:
        first.setdefault(("c", j.params["checkpoint"], j.params["lora"]), len(first))
        first.setdefault(("s", j.params["scheduler"]), len(first))
    return sorted(jobs, key=lambda j: (first[("c", j.params["checkpoint"], j.params["lora"])],
                                       first[("s", j.params["scheduler"])]))


# ---- labels --------------------------------------------------------------------------------------------

def _labels(axis: Axis | None) -> list[str]:
    if axis is None:
        return [""]
    prefix = "prompt" if axis.name == "prompt_sr" else axis.name
    return [f"{prefix}: {lab}" for lab in axis.labels]


def _legend(plan: GridPlan) -> list[str]:
    on_axes = set()
    for a in plan.axes.values():
        if a is not None:
            on_axes |= {"width", "height"} if a.name == "size" else {a.name}
    spec = plan.spec
    items = []
    if "prompt" not in on_axes and "prompt_sr" not in on_axes:
        items.append(f"prompt: {spec.prompt}")
    if spec.negative_prompt and "negative" not in on_axes:
        items.append(f"negative: {spec.negative_prompt}")
    fixed = [("checkpoint", spec.checkpoint), ("cfg", f"{spec.cfg:g}"), ("steps", spec.steps),
             ("scheduler", spec.scheduler or "checkpoint's own"), ("width", spec.width), ("height", spec.height)]
    if spec.lora:
        fixed += [("lora", spec.lora), ("lora_scale", spec.lora_scale)]
    items.append(", ".join(f"{k}: {v}" for k, v in fixed if k not in on_axes))
    if plan.seeds:
        items.append(f"seeds per cell (left to right): {', '.join(str(s) for s in plan.seeds)}")
    return items


# ---- running -------------------------------------------------------------------------------------------

def run_grid(spec: GridSpec, out: str | Path, *, device: str | None = None, dtype=None, allow_pickle: bool = False,
             progress: bool = True, cache=None) -> dict:
    """Generate (resumably) and draw the grid into ``out``; returns the grid.json dict.
    ``cache``: a :class:`~harness.generate.pipes.PipelineCache` to reuse loaded checkpoints."""
    out = Path(out)
    plan = plan_grid(spec)
    counts = run_jobs(ordered_jobs(plan), out, batch_size=spec.batch_size, device=device, dtype=dtype,
                      allow_pickle=allow_pickle, progress=progress, cache=cache)
    az = plan.axes["z"]
    labels = _labels(plan.axes["x"]), _labels(plan.axes["y"]), _labels(az)
    legend = _legend(plan)
    page_records, z_first = [], []
    for zi in range(len(labels[2])):
        records, first = _draw_z(plan, out, zi, labels, legend)
        page_records += records
        if first is not None:
            z_first.append(first)
    overview = None
    if az is not None:
        overview = "overview.png"
        save_image(out / overview, draw_overview(z_first, labels[2], spec.max_grid_px))
    data = _grid_record(plan, page_records, overview, legend, counts)
    atomic_write_json(out / "grid.json", data)
    return data


def _draw_z(plan: GridPlan, out: Path, zi: int, labels: tuple[list[str], list[str], list[str]],
            legend: list[str]) -> tuple[list[dict], object]:
    """Draw and save z value ``zi``'s pages (one unless it is too large for ``max_grid_px``).
    Returns their ``grid.json`` records and the first page (for the overview)."""
    from PIL import Image

    col_labels, row_labels, z_labels = labels
    az = plan.axes["z"]

    def load(c: Cell) -> list:
        return [Image.open(out / j.file).convert("RGB") for j in c.jobs]
    zcells = [c for c in plan.cells if c.z == zi]
    lay = Layout(max(c.params["width"] for c in zcells), max(c.params["height"] for c in zcells),
                 len(zcells[0].jobs))
    splits = pages(len(row_labels), len(col_labels), lay.cell_w + lay.gap, lay.img_h + lay.gap,
                   plan.spec.max_grid_px)
    records, first = [], None
    for pi, (rows, cols) in enumerate(splits):
        imgs = {(r, c): load(plan.cell(cc, rr, zi)) for r, rr in enumerate(rows) for c, cc in enumerate(cols)}
        title = z_labels[zi] if az else ""
        if len(splits) > 1:
            title = f"{title}  (page {pi + 1} of {len(splits)})".strip()
        canvas, boxes = draw_grid(imgs, [col_labels[c] for c in cols], [row_labels[r] for r in rows],
                                  title=title, legend=legend)
        name = f"grid_z{zi}_p{pi}.png" if (az or len(splits) > 1) else "grid.png"
        save_image(out / name, canvas)
        records.append(_page_record(plan, zi, pi, name, rows, cols, canvas, boxes))
        if pi == 0:
            first = canvas
    return records, first


def _page_record(plan: GridPlan, zi: int, pi: int, name: str, rows: list[int], cols: list[int], canvas,
                 boxes: list[dict]) -> dict:
    """A page's ``grid.json`` entry: its file, size and every image's box named by cell and seed."""
    for b in boxes:
        cell = plan.cell(cols[b["col"]], rows[b["row"]], zi)
        b.update(x=cell.x, y=cell.y, seed=cell.jobs[b["index"]].params["seed"])
    return {"z": zi, "page": pi, "file": name, "rows": rows, "cols": cols,
            "width": canvas.width, "height": canvas.height,
            "boxes": [{k: b[k] for k in ("x", "y", "seed", "box")} for b in boxes]}


def _grid_record(plan: GridPlan, page_records: list[dict], overview: str | None, legend: list[str],
                 counts: dict) -> dict:
    """The ``grid.json`` dict (see the module docstring)."""
    from harness.provenance import record as provenance

    data = {
        "version": 1, "spec": _jsonable(asdict(plan.spec)), "fixed": {k: v for k, v in plan.cells[0].params.items()},
        "axes": {k: (None if a is None else {"name": a.name, "values": _jsonable(list(a.values)),
                                             "labels": list(a.labels), "search": a.search})
                 for k, a in plan.axes.items()},
        "seeds": plan.seeds,
        "cells": [{"x": c.x, "y": c.y, "z": c.z, "params": c.params,
                   "images": [{"seed": j.params["seed"], "file": j.file, "key": job_key(j.params)} for j in c.jobs]}
                  for c in plan.cells],
        "pages": page_records, "overview": overview, "legend": legend, "counts": counts,
        "provenance": provenance(kind="grid"),
    }
    for a in plan.axes.values():  # parameters that vary are not "fixed"
        if a is not None:
            for key in (("width", "height") if a.name == "size" else
                        ("prompt",) if a.name == "prompt_sr" else (_param_of(a.name),)):
                data["fixed"].pop(key, None)
    return data


def _param_of(axis_name: str) -> str:
    from harness.generate.axes import AXES

    return AXES[axis_name][1]


def _jsonable(obj):
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    return obj
