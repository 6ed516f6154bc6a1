"""Drawing comparison grids: labelled pages of cell images, page splitting and the z overview.

Labels use DejaVuSans (shipped with matplotlib) and greedy word wrap, so pages look the same on every
machine; :func:`draw_grid` returns each image's pixel box so ``grid.json`` can point at cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.io import atomic_write_bytes


def font(size: int):
    """DejaVuSans (ships with matplotlib), so labels look the same everywhere with no downloads."""
    import matplotlib
    from PIL import ImageFont

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(str(path), size)
    except OSError:
        return ImageFont.load_default(size)


def wrap(text: str, fnt, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels (long words are cut)."""
    lines: list[str] = []
    for para in str(text).split("\n"):
        line = ""
        for word in para.split(" "):
            trial = f"{line} {word}" if line else word
            if fnt.getlength(trial) <= width or not line:
                line = trial
                while fnt.getlength(line) > width and len(line) > 1:
                    cut = max(1, int(len(line) * width / fnt.getlength(line)))
                    lines.append(line[:cut])
                    line = line[cut:]
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines


@dataclass
class Layout:
    img_w: int
    img_h: int
    per_cell: int
    gap: int = 4

    @property
    def cell_w(self) -> int:
        return self.per_cell * self.img_w + (self.per_cell - 1) * 2

    @property
    def font_size(self) -> int:
        return max(12, min(32, self.img_h // 10))


def draw_grid(images: dict[tuple[int, int], list], col_labels: list[str], row_labels: list[str],
              title: str = "", legend: list[str] | None = None, seeds: list | None = None) -> tuple:
    """Draw one page. ``images[(row, col)]`` is the cell's list of PIL images (one per seed).

    Returns (image, boxes) with boxes = [{"row", "col", "index", "box": [l, t, r, b]}]."""
    from PIL import Image, ImageDraw

    every = [im for v in images.values() for im in v]  # cells may differ in size (a size axis)
    lay = Layout(max(im.width for im in every), max(im.height for im in every),
                 max(len(v) for v in images.values()))
    fnt = font(lay.font_size)
    small = font(max(10, lay.font_size * 3 // 4))
    line_h = int(lay.font_size * 1.25)
    n_rows, n_cols = len(row_labels), len(col_labels)
    has_rows = any(row_labels)
    row_w = min(max(fnt.getlength(t) for t in row_labels) + 2 * lay.gap, max(160, lay.img_w)) if has_rows else 0
    row_w = int(row_w)
    col_lines = [wrap(t, fnt, lay.cell_w - lay.gap) for t in col_labels]
    head_h = max(len(c) for c in col_lines) * line_h + lay.gap if any(col_labels) else 0
    grid_w = row_w + n_cols * (lay.cell_w + lay.gap)
    top_lines = (wrap(title, fnt, grid_w - 2 * lay.gap) if title else [])
    legend_lines = [ln for item in (legend or []) for ln in wrap(item, small, grid_w - 2 * lay.gap)]
    top_h = len(top_lines) * line_h + len(legend_lines) * int(line_h * 0.8) + (lay.gap * 2 if top_lines or
                                                                              legend_lines else 0)
    width = grid_w + lay.gap
    height = top_h + head_h + n_rows * (lay.img_h + lay.gap) + lay.gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = lay.gap
    for ln in top_lines:
        draw.text((lay.gap, y), ln, fill="black", font=fnt)
        y += line_h
    for ln in legend_lines:
        draw.text((lay.gap, y), ln, fill=(60, 60, 60), font=small)
        y += int(line_h * 0.8)
    y0 = top_h + head_h
    for c, lines in enumerate(col_lines):
        x = row_w + lay.gap + c * (lay.cell_w + lay.gap)
        for k, ln in enumerate(lines):
            draw.text((x + (lay.cell_w - fnt.getlength(ln)) / 2, top_h + k * line_h), ln, fill="black", font=fnt)
    boxes = []
    for r in range(n_rows):
        ytop = y0 + r * (lay.img_h + lay.gap)
        if has_rows:
            lines = wrap(row_labels[r], fnt, row_w - lay.gap)
            ty = ytop + max(0, (lay.img_h - len(lines) * line_h) // 2)
            for k, ln in enumerate(lines):
                draw.text((lay.gap, ty + k * line_h), ln, fill="black", font=fnt)
        for c in range(n_cols):
            xleft = row_w + lay.gap + c * (lay.cell_w + lay.gap)
            for k, im in enumerate(images.get((r, c), [])):
                xl = xleft + k * (lay.img_w + 2)
                canvas.paste(im.convert("RGB"), (xl, ytop))
                boxes.append({"row": r, "col": c, "index": k, "box": [xl, ytop, xl + im.width, ytop + im.height]})
    return canvas, boxes


def pages(n_rows: int, n_cols: int, cell_w: int, cell_h: int, max_px: int, margin: int = 200) -> list[tuple]:
    """Split rows x cols into pages whose images stay within ``max_px`` per side: [(rows, cols)]."""
    per_col = max(1, (max_px - margin) // max(1, cell_w))
    per_row = max(1, (max_px - margin) // max(1, cell_h))
    out = []
    for r0 in range(0, n_rows, per_row):
        for c0 in range(0, n_cols, per_col):
            out.append((list(range(r0, min(n_rows, r0 + per_row))), list(range(c0, min(n_cols, c0 + per_col)))))
    return out


def draw_overview(grids: list, labels: list[str], max_px: int):
    """All z grids side by side, scaled to fit ``max_px`` wide, each under its z label."""
    from PIL import Image, ImageDraw

    scale = min(1.0, max_px / max(1, sum(g.width for g in grids) + 8 * len(grids)))
    scale = min(scale, max_px / max(g.height for g in grids))
    thumbs = [g.resize((max(1, int(g.width * scale)), max(1, int(g.height * scale))), Image.LANCZOS) for g in grids]
    fnt = font(16)
    head = 28
    w = sum(t.width for t in thumbs) + 8 * (len(thumbs) + 1)
    h = max(t.height for t in thumbs) + head + 8
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    x = 8
    for t, lab in zip(thumbs, labels):
        text = wrap(lab, fnt, t.width)[0]
        draw.text((x, 6), text, fill="black", font=fnt)
        canvas.paste(t, (x, head))
        x += t.width + 8
    return canvas


def save_image(path: Path, image) -> None:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
