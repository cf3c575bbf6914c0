"""The bench's Markdown report: summary tables, heatmaps, curves, image grids, C-LoRA norms.

Input is the ``results.json`` document written by :mod:`conceptstream.evaluation.bench`; output
is ``OUT/report.md`` with its figures in ``OUT/report/``. Plots use matplotlib's object API on the
Agg canvas (no pyplot global state, no display needed); image grids are composed with PIL.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from conceptstream.evaluation.matrices import summary_ci95
from conceptstream.evaluation.variants import slug as _slug
from conceptstream.safeio import atomic_path, write_text_atomic

# (summary key, table header, higher is better, decimals)
SUMMARY_COLUMNS: tuple[tuple[str, str, bool, int], ...] = (
    ("A_MMD", "A_MMD ↓", False, 3),
    ("BwT_MMD", "BwT_MMD ↑", True, 3),
    ("forgetting_MMD", "Forgetting_MMD ↓", False, 3),
    ("plasticity_MMD", "Plasticity_MMD ↓", False, 3),
    ("KID", "KID ↓", False, 3),
    ("I2I", "I2I ↑", True, 3),
    ("T2I", "T2I ↑", True, 3),
    ("DC_acc", "DC acc ↑", True, 3),
    ("DC_acc_own_class", "DC acc own-class ↑", True, 3),
    ("DC_ECE", "DC ECE ↓", False, 3),
    ("learn_seconds", "train s", False, 0),
)
MATRIX_METRICS = ("MMD", "KID", "I2I", "T2I")
PAIRED_KEYS = ("A_MMD", "BwT_MMD", "plasticity_MMD", "DC_acc")


def _link(path: str) -> str:
    """A relative path usable inside a Markdown link (spaces and parentheses escaped)."""
    return path.replace(" ", "%20").replace("(", "%28").replace(")", "%29")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")


def _save_image(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ------------------------------------------------------------------------------ tables


def summary_table(doc: Mapping[str, Any]) -> list[str]:
    """One row per method: each summary's mean over seeds ± the half-width of its 95% t-interval
    (the mean alone for one seed), the best mean of each column in bold."""
    summary = doc.get("summary", {})
    t2i = doc.get("t2i", {}).get("available", False)
    cols = [c for c in SUMMARY_COLUMNS if c[0] != "T2I" or t2i]
    best: dict[str, float] = {}
    for key, _, higher, _ in cols:
        means = [s[key]["mean"] for s in summary.values() if _finite((s.get(key) or {}).get("mean"))]
        if len(means) > 1 and key != "learn_seconds":
            best[key] = max(means) if higher else min(means)
    lines = ["| method | seeds | " + " | ".join(c[1] for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for label, s in summary.items():
        n = max([(s.get(k) or {}).get("n", 0) or 0 for k, *_ in cols] + [0])
        cells = []
        for key, _, _, nd in cols:
            agg = s.get(key) or {}
            mean = agg.get("mean")
            if not _finite(mean):
                cells.append("n/a")
                continue
            half = summary_ci95(agg)  # None for one seed: no spread to show
            text = f"{mean:.{nd}f} ± {half:.{nd}f}" if half is not None else f"{mean:.{nd}f}"
            cells.append(f"**{text}**" if key in best and mean == best[key] else text)
        lines.append(f"| `{label}` | {n} | " + " | ".join(cells) + " |")
    return lines


def paired_reference(doc: Mapping[str, Any]) -> str | None:
    """What the other methods are paired with: sequential ``lora`` when it ran, else the first label."""
    labels = list(doc.get("runs", {}))
    return "lora" if "lora" in labels else (labels[0] if labels else None)


# The paper's method: a second paired table sets every other method against it (e.g. ewc-dc - c-lora).
PAPER_METHOD = "ewc-dc"


def paired_references(doc: Mapping[str, Any]) -> list[str]:
    """Every reference the report pairs with: :func:`paired_reference`, then the first run of the paper's
    method (its plain label, e.g. ``ewc-dc`` or ``ewc-dc-vera``) when it ran beside it."""
    first = paired_reference(doc)
    paper = next((lb for lb, r in doc.get("runs", {}).items()
                  if r.get("method") == PAPER_METHOD and not r.get("sweep")), None)
    refs = [first] if first is not None else []
    return refs + [paper] if paper is not None and paper != first else refs


def _paired_rows(doc: Mapping[str, Any], reference: str | None = None
                 ) -> tuple[str, dict[str, dict[str, dict[str, Any]]]] | None:
    """The reference (default :func:`paired_reference`) and, per other method, its paired differences;
    None when no method shares two or more seeds with the reference."""
    from conceptstream.evaluation.matrices import paired_differences

    reference = reference or paired_reference(doc)
    if reference is None:
        return None
    higher = {key: hib for key, _, hib, _ in SUMMARY_COLUMNS if key in PAIRED_KEYS}
    per_seed = {lb: {k: run.get("summary") or {} for k, run in r["seeds"].items()} for lb, r in doc["runs"].items()}
    rows = {lb: paired_differences(seeds, per_seed[reference], higher)
            for lb, seeds in per_seed.items() if lb != reference}
    if not any((d.get("n") or 0) > 1 for diffs in rows.values() for d in diffs.values()):
        return None
    return reference, rows


def _paired_cell(d: Mapping[str, Any], nd: int) -> str:
    """``mean [low, high] separated (wins/n better)``; one seed gives no interval."""
    if not d["n"]:
        return "n/a"
    wins = f"({d['wins']}/{d['n']} better)"
    if d["ci_low"] is None:
        return f"{d['mean']:+.{nd}f} {wins}"
    verdict = "**separated**" if d["separated"] else "not separated"
    return f"{d['mean']:+.{nd}f} [{d['ci_low']:+.{nd}f}, {d['ci_high']:+.{nd}f}] {verdict} {wins}"


def paired_table(doc: Mapping[str, Any], reference: str | None = None) -> list[str]:
    """Each method minus the reference (default :func:`paired_reference`) on the same seed: the mean
    difference over seeds with its 95% t-interval, whether that interval excludes 0 ("separated"), and on
    how many seeds the method was better. Empty when no method shares two or more seeds with the reference."""
    paired = _paired_rows(doc, reference)
    if paired is None:
        return []
    reference, rows = paired
    keys = [key for key, *_ in SUMMARY_COLUMNS if key in PAIRED_KEYS]
    heads = {key: head for key, head, _, _ in SUMMARY_COLUMNS}
    lines = [f"| method - `{reference}` | seeds | " + " | ".join(f"Δ {heads[k]} [95% CI]" for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for lb, diffs in rows.items():
        n = max(d["n"] for d in diffs.values())
        cells = [_paired_cell(diffs[key], 3 if key.startswith("DC_") else 1) for key in keys]
        lines.append(f"| `{lb}` | {n} | " + " | ".join(cells) + " |")
    return lines


def paired_note(doc: Mapping[str, Any], reference: str | None = None) -> str:
    """How to read the paired table: what "separated" means, with the seeds it rests on."""
    paired = _paired_rows(doc, reference)
    diffs = [d for row in paired[1].values() for d in row.values()] if paired else []
    return (f"How to read: {_separated_phrase(diffs)} "
            "Δ < 0 is better for ↓ columns, Δ > 0 for ↑ columns; few seeds give wide intervals.")


def _separated_phrase(diffs: Sequence[Mapping[str, Any]]) -> str:
    """What "separated" means, with the seed counts ``n`` of the paired differences ``diffs`` it describes."""
    from conceptstream.evaluation.matrices import t_quantile

    counts = sorted({d["n"] for d in diffs if d["n"] > 1})
    if len(counts) == 1:
        n = counts[0]
        seeds = f"with {n} seeds (interval: mean ± {t_quantile(0.975, n - 1):.3f} × sd / √{n})"
    else:
        seeds = "with n seeds (the seeds column; interval: mean ± t(0.975, n-1) × sd / √n)"
    return f"separated = the 95% t-interval of the per-seed paired difference excludes 0; {seeds}."


# ------------------------------------------------------------------------------ plots


def _mean_matrix(doc: Mapping[str, Any], label: str, metric: str) -> list[list[float | None]] | None:
    return ((doc["runs"].get(label) or {}).get("mean_matrices") or {}).get(metric)


def heatmaps(doc: Mapping[str, Any], metric: str, path: Path) -> bool:
    """One panel per method: the seed-mean matrix M[n][i] of ``metric`` (upper triangle blank)."""
    import numpy as np

    labels = [lb for lb in doc["runs"] if _mean_matrix(doc, lb, metric)]
    if not labels:
        return False
    mats = {lb: np.array([[np.nan if v is None else v for v in row] for row in _mean_matrix(doc, lb, metric)],
                         dtype=float) for lb in labels}
    values = np.concatenate([m[np.isfinite(m)] for m in mats.values()])
    if values.size == 0:
        return False
    vmin, vmax = float(values.min()), float(values.max())
    if vmin == vmax:
        vmin, vmax = vmin - 1e-9, vmax + 1e-9
    n = next(iter(mats.values())).shape[0]
    cols = min(4, len(labels))
    rows = math.ceil(len(labels) / cols)
    size = max(2.6, min(6.0, 0.45 * n + 1.2))
    fig = _figure(cols * size + 1.0, rows * size)
    higher = doc.get("metrics", {}).get(metric, {}).get("higher_is_better", False)
    cmap = "viridis" if higher else "viridis_r"
    image = None
    for k, lb in enumerate(labels):
        ax = fig.add_subplot(rows, cols, k + 1)
        m = np.ma.masked_invalid(mats[lb])
        image = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title(lb, fontsize=9)
        ax.set_xlabel("concept i", fontsize=8)
        if k % cols == 0:
            ax.set_ylabel("after task n", fontsize=8)
        ticks = list(range(n)) if n <= 12 else list(range(0, n, max(1, n // 10)))
        ax.set_xticks(ticks, [str(t + 1) for t in ticks], fontsize=7)
        ax.set_yticks(ticks, [str(t + 1) for t in ticks], fontsize=7)
        if n <= 8:
            for r in range(n):
                for c in range(r + 1):
                    value = mats[lb][r, c]
                    if np.isfinite(value):
                        # Dark text on the bright end of the colour map, white on the dark end.
                        bright = (value - vmin) / (vmax - vmin) < 0.5 if not higher else (value - vmin) / (vmax - vmin) > 0.5
                        ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=6,
                                color="k" if bright else "w")
    arrow = "higher is better" if higher else "lower is better"
    fig.suptitle(f"{metric} matrix M[n][i] (mean over seeds; {arrow}; brighter = better)", fontsize=10)
    fig.colorbar(image, ax=fig.axes, shrink=0.8)
    _save_figure(fig, path)
    return True


def curves(doc: Mapping[str, Any], metric: str, path: Path) -> bool:
    """Left: mean over seen concepts after each task. Right: the first concept over tasks (forgetting)."""
    labels = [lb for lb in doc["runs"] if _mean_matrix(doc, lb, metric)]
    if not labels:
        return False
    fig = _figure(11, 4)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for lb in labels:
        m = _mean_matrix(doc, lb, metric)
        # only fully scored rows: a sparse row (bench --eval-every) holds just the newest concept
        full = [n for n, row in enumerate(m) if all(v is not None for v in row[: n + 1])]
        left.plot([n + 1 for n in full], [sum(m[n][: n + 1]) / (n + 1) for n in full], marker="o", ms=3, label=lb)
        right.plot([n + 1 for n in full], [m[n][0] for n in full], marker="o", ms=3, label=lb)
    unit = "" if metric in ("I2I", "T2I") else " (x1e3)"
    left.set_title(f"{metric}{unit}: mean over concepts learned so far", fontsize=9)
    right.set_title(f"{metric}{unit} of concept 1 after each task", fontsize=9)
    from matplotlib.ticker import MaxNLocator

    for ax in (left, right):
        ax.set_xlabel("task")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    right.legend(fontsize=7, loc="best")
    _save_figure(fig, path)
    return True


def clora_norms(doc: Mapping[str, Any], out: Path, label: str, path: Path) -> bool:
    """LoRA norm and L_forget per step over the whole stream (first seed), task boundaries marked."""
    seeds = doc["runs"][label]["seeds"]
    if not seeds:
        return False
    run = seeds[sorted(seeds, key=int)[0]]
    steps, norm, forget, bounds = [], [], [], []
    g = 0
    for t in run["tasks"]:
        if not t.get("logs") or not (out / t["logs"]).is_file():
            continue
        bounds.append(g)
        for entry in json.loads((out / t["logs"]).read_text()):
            if "lora_norm" in entry:
                steps.append(g)
                norm.append(entry["lora_norm"])
                forget.append(entry.get("l_forget"))
                g += 1
    if not steps:
        return False
    fig = _figure(11, 3.6)
    a, b = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    a.plot(steps, norm, lw=1)
    a.set_title("C-LoRA: norm of the current task's LoRA (B A)", fontsize=9)
    b.plot(steps, [math.nan if v is None else v for v in forget], lw=1, color="tab:red")
    b.set_title("C-LoRA: L_forget per step", fontsize=9)
    positive = [v for v in forget if v is not None and v > 0]
    if positive and len(positive) == len([v for v in forget if v is not None]):
        b.set_yscale("log")
    else:
        b.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    from matplotlib.ticker import MaxNLocator

    for ax in (a, b):
        ax.set_xlabel("training step (all tasks)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        for x in bounds[1:]:
            ax.axvline(x, color="grey", lw=0.6, ls="--")
    _save_figure(fig, path)
    return True


# ------------------------------------------------------------------------------ image grids


def _font():
    return ImageFont.load_default()


def labelled_grid(cells: Sequence[Sequence[Image.Image | None]], row_labels: Sequence[str],
                  col_labels: Sequence[str], tile: int = 96, label_width: int | None = None) -> Image.Image:
    """Rows x columns of tiles with text labels on the left and on top; ``None`` cells stay blank."""
    n_rows, n_cols = len(cells), max(len(r) for r in cells)
    if label_width is None:
        label_width = min(300, 8 + 6 * max([len(t) for t in row_labels] + [8]))
    head = 30
    pad = 2
    grid = Image.new("RGB", (label_width + n_cols * (tile + pad) + pad, head + n_rows * (tile + pad) + pad),
                     (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = _font()
    for c, text in enumerate(col_labels):
        x = label_width + pad + c * (tile + pad)
        # Two lines of up to tile/6 characters each.
        width = max(4, tile // 6)
        draw.text((x, 2), text[:width], fill=(0, 0, 0), font=font)
        if len(text) > width:
            draw.text((x, 14), text[width: 2 * width], fill=(0, 0, 0), font=font)
    for r, row in enumerate(cells):
        y = head + pad + r * (tile + pad)
        draw.text((2, y + tile // 2 - 6), row_labels[r][: label_width // 6], fill=(0, 0, 0), font=font)
        for c, im in enumerate(row):
            x = label_width + pad + c * (tile + pad)
            if im is None:
                draw.rectangle((x, y, x + tile - 1, y + tile - 1), fill=(235, 235, 235))
            else:
                grid.paste(im.convert("RGB").resize((tile, tile), Image.Resampling.NEAREST), (x, y))
    return grid


def _first_tile(out: Path, rel: str | None, tiles: int | None) -> Image.Image | None:
    if not rel or not (out / rel).is_file():
        return None
    with Image.open(out / rel) as strip:
        strip.load()
        k = max(1, int(tiles or round(strip.width / strip.height)))
        w = strip.width // k
        return strip.crop((0, 0, w, strip.height)).convert("RGB")


def _first_seed(doc: Mapping[str, Any], label: str) -> dict[str, Any] | None:
    seeds = doc["runs"][label]["seeds"]
    return seeds[sorted(seeds, key=int)[0]] if seeds else None


def _real_image(doc: Mapping[str, Any], concept: Mapping[str, Any], out: Path) -> Image.Image | None:
    from conceptstream.concepts.folder import list_images

    folder = Path(out) / doc["settings"]["data"] / concept["name"] / "eval"  # relative to out (older: absolute)
    if not folder.is_dir():
        return None
    paths = list_images(folder)
    if not paths:
        return None
    with Image.open(paths[0]) as im:
        return im.convert("RGB")


def final_grid(doc: Mapping[str, Any], out: Path, path: Path) -> bool:
    """Concepts x methods after the last task (first seed, first sample), with a real held-out view."""
    concepts = doc["settings"]["concepts"]
    labels = [lb for lb in doc["runs"] if _first_seed(doc, lb)]
    if not labels:
        return False
    cells = []
    for i, c in enumerate(concepts):
        row = [_real_image(doc, c, out)]
        for lb in labels:
            run = _first_seed(doc, lb)
            last = run["tasks"][-1]
            row.append(_first_tile(out, (last.get("samples") or [None] * (i + 1))[i], last.get("sample_tiles")))
        cells.append(row)
    grid = labelled_grid(cells, [f"{c['token']} {c['noun']}" for c in concepts], ["real (held-out)", *labels])
    _save_image(grid, path)
    return True


def task_grid(doc: Mapping[str, Any], out: Path, label: str, path: Path) -> bool:
    """Concept x task for one method: how each concept's samples change as later tasks are learned."""
    run = _first_seed(doc, label)
    if not run:
        return False
    concepts = doc["settings"]["concepts"]
    tasks = run["tasks"]
    cells = []
    for i in range(len(concepts)):
        row = []
        for n, t in enumerate(tasks):
            samples = t.get("samples") or []
            row.append(_first_tile(out, samples[i], t.get("sample_tiles")) if i <= n and i < len(samples) else None)
        cells.append(row)
    grid = labelled_grid(cells, [f"{c['token']} {c['noun']}" for c in concepts],
                         [f"after task {n + 1}" for n in range(len(tasks))])
    _save_image(grid, path)
    return True


# ------------------------------------------------------------------------------ the report


def steps_text(settings: Mapping[str, Any]) -> str:
    """"200 steps per task", or each run's budget when methods have their own (Textual Inversion's)."""
    per_task = settings.get("steps_per_task") or {}
    if len(set(per_task.values())) > 1:
        return ", ".join(f"`{label}` {n}" for label, n in per_task.items()) + " steps per task"
    return f"{settings.get('steps') or next(iter(per_task.values()), 'default')} steps per task"


def _settings_lines(doc: Mapping[str, Any]) -> list[str]:
    s = doc["settings"]
    g = s["generation"]
    f = s["features"]
    v = doc.get("versions", {})
    concepts = ", ".join(f"`{c['token']}` ({c['noun']}, {c['train_images']} train"
                         + (f" / {c['val_images']} val" if c.get("val_images") else "")
                         + f" / {c['eval_images']} test)" for c in s["concepts"])
    steps = steps_text(s)
    lines = [
        f"- **Sequence**: `{s['sequence']}`, {len(s['concepts'])} concepts: {concepts}",
        f"- **Split**: every score is against the **{s.get('split', 'test')}** views"
        + (" (validation: for tuning, not for publication)" if s.get("split") == "val" else ""),
        f"- **Model**: `{s['model']['reference']}` (fingerprint `{s['model']['fingerprint']}`); adapter "
        f"`{s['adapter']}`" + (f" rank {s['rank']}" if s.get("rank") else "") + f"; {steps}; "
        f"seeds {s['seeds']}" + ("; **quick mode**" if s.get("quick") else ""),
        f"- **Generation**: {g['images_per_concept']} images per concept ({g['images_per_prompt']} per prompt; "
        f"prompt `a photo of a <token> NOUN`"
        + ("".join(f", `... {c}`" for c in g["contexts"])) + f"), {g['sampler']} {g['steps']} steps, guidance "
        f"{g['guidance']}, fixed seeds",
        f"- **Features**: `{f['name']}` ({f['dim']}-d); MMD and KID are x10^3; I2I is a cosine similarity",
        f"- **DC accuracy**: held-out real images classified among {s['dc_eval']['candidates']}, "
        f"{s['dc_eval']['eval_timesteps']} stratified timesteps",
        "- **T2I**: " + (f"{'available' if doc['t2i']['available'] else 'not available: ' + str(doc['t2i']['reason'])}"),
        f"- **Wall time**: {doc.get('wall_seconds', 0):.0f}s (this invocation); versions: "
        + ", ".join(f"{k} {val}" for k, val in v.items() if k != "platform"),
    ]
    if s.get("fixed_adapter"):
        lines.append("- " + ", ".join(f"`{m}` always runs on {a}" for m, a in s["fixed_adapter"].items())
                     + " (the method is defined on that adapter)")
    if s.get("sweep"):
        lines.append("- **Sweep**: " + ", ".join(f"`{k}` in {v}" for k, v in s["sweep"].items()))
    return lines


def method_settings_table(doc: Mapping[str, Any]) -> list[str]:
    """Every setting each method ran with (its first seed's run config), defaults included: a reader
    should not need the library version's defaults to know what a row means."""
    rows = []
    for label in doc["runs"]:
        run = _first_seed(doc, label)
        settings = (run or {}).get("config", {}).get("settings") or (run or {}).get("hparams")
        if settings:
            rows.append(f"| `{label}` | " + ", ".join(f"`{k}={v}`" for k, v in sorted(settings.items())) + " |")
    return ["| method | settings |", "|---|---|", *rows] if rows else []


def _bound_lines(doc: Mapping[str, Any]) -> list[str]:
    """What the reference rows (``single-task``, ``joint``) of this table are, if it has any."""
    from conceptstream.evaluation.variants import BOUNDS

    bounds = {r.get("bound") for r in doc.get("runs", {}).values()} & set(BOUNDS)
    if not bounds:
        return []
    lines = ["Reference rows (not continual methods; trained with `lora`'s plain loss on the same adapter):"]
    lines += [f"- `{b}`: {BOUNDS[b]}." for b in BOUNDS if b in bounds]
    if "single-task" in bounds:
        lines.append("  single-task has no DC accuracy (no one model knows every concept); its BwT and forgetting "
                     "are 0 by construction.")
    if "joint" in bounds:
        lines.append("  joint is scored once, after all concepts: its plasticity, BwT and forgetting are undefined.")
    return [*lines, ""]


TRANSFER_REFERENCE = "single-task"  # the fresh-adapter row that each concept's first score is compared with
TRANSFER_TASK_COLUMNS = 10  # per-task columns up to this stream length; longer streams get only the means


def _diagonal(run: Mapping[str, Any]) -> list[float | None]:
    """A run's MMD right after each task (None where it was not scored)."""
    from conceptstream.evaluation.matrices import ContinualMatrix

    rows = (run.get("matrices") or {}).get("MMD")
    diagonal = ContinualMatrix.from_list(rows).diagonal() if rows else []
    return [None if math.isnan(v) else v for v in diagonal]


def transfer_rows(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per continual method, how it learned each concept compared with :data:`TRANSFER_REFERENCE` on the same
    seed: ``d = reference M[i][i] - method M[i][i]`` (MMD, lower is better, so d > 0 = the method drew concept
    i better right after learning it than a fresh adapter from the base model did). ``first`` is task 1's d
    (0 for ``lora`` by construction: the same start, adapter and seeds, so a check), ``later`` the mean d over
    tasks 2..N (forward transfer: what the earlier concepts' training gives the later ones), each as
    :func:`paired_differences` aggregates over seeds; ``per_task`` the mean d per task over seeds. Empty
    without a ``single-task`` row."""
    from conceptstream.evaluation.matrices import paired_differences

    runs = doc.get("runs", {})
    ref = next((r for r in runs.values() if r.get("bound") == TRANSFER_REFERENCE), None)
    if ref is None:
        return {}
    ref_diag = {k: _diagonal(run) for k, run in ref["seeds"].items()}
    out: dict[str, dict[str, Any]] = {}
    for label, r in runs.items():
        if r.get("bound"):
            continue
        per_seed, per_task = {}, {}
        for k, run in r["seeds"].items():
            if k not in ref_diag:
                continue
            d = [None if a is None or b is None else b - a for a, b in zip(_diagonal(run), ref_diag[k])]
            later = [x for x in d[1:] if x is not None]
            per_seed[k] = {"first": d[0] if d else None, "later": sum(later) / len(later) if later else None}
            for i, x in enumerate(d):
                if x is not None:
                    per_task.setdefault(i, []).append(x)
        if not per_seed:
            continue
        zero = {k: {"first": 0.0, "later": 0.0} for k in per_seed}
        out[label] = {**paired_differences(per_seed, zero, {"first": True, "later": True}),
                      "per_task": {i: sum(v) / len(v) for i, v in sorted(per_task.items())}}
    return out


def transfer_lines(doc: Mapping[str, Any]) -> list[str]:
    """The report's section on :func:`transfer_rows`: what the ``single-task`` bound bounds in this bench."""
    rows = transfer_rows(doc)
    if not rows:
        return []
    n_tasks = max((max(r["per_task"], default=-1) + 1 for r in rows.values()), default=0)
    tasks = list(range(n_tasks)) if n_tasks <= TRANSFER_TASK_COLUMNS else []
    lines = [f"### Each concept right after it was learned, against `{TRANSFER_REFERENCE}` (same seed)", "",
             f"d = `{TRANSFER_REFERENCE}`'s MMD of concept i minus the method's, both right after concept i was "
             "learned (d > 0: the method drew it better than a fresh adapter from the base model did). Task 1 "
             "starts from the base model for every adapter method, so `lora`'s d there is 0 (a check); for tasks "
             "2..N it is forward transfer: what learning the earlier concepts gave the later ones. Where it is "
             f"positive, `{TRANSFER_REFERENCE}` is not a ceiling on plasticity in this bench; "
             + _separated_phrase([r[key] for r in rows.values() for key in ("first", "later")]), "",
             "| method | seeds | d task 1 [95% CI] | mean d tasks 2..N [95% CI] |"
             + "".join(f" d task {i + 1} |" for i in tasks),
             "|---|---|---|---|" + "---|" * len(tasks)]
    for label, r in rows.items():
        n = max(r["first"]["n"], r["later"]["n"])
        cells = [_paired_cell(r["first"], 1), _paired_cell(r["later"], 1)]
        cells += [f"{r['per_task'][i]:+.1f}" if i in r["per_task"] else "" for i in tasks]
        lines.append(f"| `{label}` | {n} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def adapter_change_lines(doc: Mapping[str, Any]) -> list[str]:
    """How far each task moved the shared adapter (``adapter_change`` of the runs' task records: the relative
    change of what the adapter adds to the weights), mean over seeds per task; empty when no run recorded it."""
    rows: dict[str, dict[int, list[float]]] = {}
    for label, r in doc.get("runs", {}).items():
        for run in r.get("seeds", {}).values():
            for i, task in enumerate(run.get("tasks") or []):
                if task.get("adapter_change") is not None:
                    rows.setdefault(label, {}).setdefault(i, []).append(task["adapter_change"])
    if not rows:
        return []
    n_tasks = max(max(per) + 1 for per in rows.values())
    tasks = list(range(1, n_tasks)) if n_tasks <= TRANSFER_TASK_COLUMNS else []
    lines = ["### How far each task moved the shared adapter", "",
             "||dW after the task - dW before|| / ||dW before||, with dW = B @ A of every LoRA layer (other adapters: "
             "their tensors), mean over seeds; 0 = the task was learned by its token alone. Methods with one "
             "adapter per task (`c-lora`: the current one) or without an adapter file are not comparable or absent.", "",
             "| method | mean over tasks 2..N |" + "".join(f" task {i + 1} |" for i in tasks),
             "|---|---|" + "---|" * len(tasks)]
    for label, per in rows.items():
        means = {i: sum(v) / len(v) for i, v in per.items()}
        overall = sum(means.values()) / len(means)
        cells = [f"{overall:.4f}"] + [f"{means[i]:.4f}" if i in means else "" for i in tasks]
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_report(doc: Mapping[str, Any], out: str | Path) -> Path:
    """Write ``out/report.md`` (and figures under ``out/report/``) from a results document."""
    out = Path(out)
    figs = out / "report"
    figs.mkdir(parents=True, exist_ok=True)
    rel = lambda p: _link(p.relative_to(out).as_posix())  # noqa: E731
    md: list[str] = ["# conceptstream bench report", ""]
    if not doc.get("complete"):
        md += ["> **Incomplete**: some runs have not finished or failed; numbers cover finished runs only.", ""]
    md += ["## Settings", "", *_settings_lines(doc), ""]
    settings_table = method_settings_table(doc)
    if settings_table:
        md += ["### Method settings", "", *settings_table, ""]
    md += ["## Summary (mean ± 95% t-interval half-width over seeds)", "",
           "A = average over all concepts after the last task; BwT = mean of (score when learned - score at "
           "the end), negative means forgetting; Forgetting = final score minus the best earlier score; "
           "Plasticity = mean score of each concept right after it was learned. Best mean in bold. "
           "± is the half-width of the 95% Student-t interval of the mean (none for one seed).", "",
           *summary_table(doc), ""]
    md += _bound_lines(doc)
    md += transfer_lines(doc)
    md += adapter_change_lines(doc)
    for i, reference in enumerate(paired_references(doc)):
        paired = paired_table(doc, reference)
        if not paired:
            continue
        why = ("" if i == 0 else f" Here every method is set against the paper's method, so a row reads "
               f"\"that method minus `{reference}`\".")
        md += [f"### Paired with `{reference}` (same seed)", "",
               "Each method minus the reference on the same seed, so the spread that a seed gives every method "
               "(shared data draws, learning and generation seeds) cancels: a difference can be separated here even "
               f"when the intervals in the table above overlap.{why}", "", paired_note(doc, reference), "", *paired, ""]
    if not doc.get("t2i", {}).get("available"):
        md += [f"T2I is not reported: {doc.get('t2i', {}).get('reason')}.", ""]
    if doc.get("failed"):
        md += ["### Failed runs", ""]
        md += [f"- `{f['label']}` seed {f['seed']} (`{f['run']}`): {f['error']}" for f in doc["failed"]]
        md += [""]

    md += ["## Continual matrices", ""]
    for metric in MATRIX_METRICS:
        p = figs / f"heatmap-{metric}.png"
        if heatmaps(doc, metric, p):
            md += [f"### {metric}", "", f"![{metric} heatmaps]({rel(p)})", ""]
    md += ["## Metrics over tasks", ""]
    for metric in MATRIX_METRICS:
        p = figs / f"curve-{metric}.png"
        if curves(doc, metric, p):
            md += [f"![{metric} over tasks]({rel(p)})", ""]

    md += ["## Samples", ""]
    p = figs / "grid-final.png"
    if final_grid(doc, out, p):
        md += ["### All methods after the last task", "",
               "One row per concept: a real held-out view, then the first sample of `a photo of a <token> NOUN` "
               "from each method (first seed).", "", f"![final samples]({rel(p)})", ""]
    for label in doc["runs"]:
        p = figs / f"grid-tasks-{_slug(label)}.png"
        if task_grid(doc, out, label, p):
            md += [f"### `{label}`: each concept after every task", "", f"![{label} over tasks]({rel(p)})", ""]

    multi = [(lb, _first_seed(doc, lb)) for lb in doc["runs"]]
    multi = [(lb, run) for lb, run in multi if run and run.get("multi")]
    if multi:
        md += ["## Multi-concept samples", "", "Two learned tokens in one prompt, final model, first seed.", ""]
        for lb, run in multi:
            for m in run["multi"]:
                if (out / m["image"]).is_file():
                    md += [f"- `{lb}`: `{m['prompt']}`", "", f"  ![{lb} multi]({_link(m['image'])})", ""]

    clora = [lb for lb, r in doc["runs"].items() if r.get("method") == "c-lora"]
    if clora:
        md += ["## C-LoRA norms", "",
               "The paper's critique of C-LoRA: its penalty is minimised by shrinking the new LoRA, so the norm "
               "of each task's LoRA collapses. Logged per training step (first seed); dashed lines are task "
               "boundaries.", ""]
        for lb in clora:
            p = figs / f"clora-norms-{_slug(lb)}.png"
            if clora_norms(doc, out, lb, p):
                md += [f"![{lb} norms]({rel(p)})", ""]

    md += ["## Runs", "", "| method | seed | train s | eval s | peak RSS MiB | state KiB | result |",
           "|---|---|---|---|---|---|---|"]
    for lb, r in doc["runs"].items():
        for seed, run in sorted(r["seeds"].items(), key=lambda kv: int(kv[0])):
            learn = sum(t.get("learn_seconds") or 0 for t in run["tasks"])
            ev = sum(t.get("eval_seconds") or 0 for t in run["tasks"]) + (run.get("final_eval_seconds") or 0)
            peaks = [(t.get("memory") or {}).get("peak_rss_mib") for t in run["tasks"]]
            peak = max([p for p in peaks if p is not None], default=None)
            res = f"{run['run_dir']}/result.json"
            md.append(f"| `{lb}` | {seed} | {learn:.0f} | {ev:.0f} | {peak if peak is not None else 'n/a'} | "
                      f"{(run.get('state_bytes') or 0) / 1024:.0f} | [result.json]({_link(res)}) |")
    md += ["", "Every number, matrix and setting is in [results.json](results.json)."]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(md) + "\n")
    return path
