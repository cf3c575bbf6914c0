"""`conceptstream demo`: learn a short tabletop stream on the bundled model and show it.

After each task it writes a grid (one row per concept learned so far: a real training view, then
generated samples) and, at the end, a Markdown report linking them.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from PIL import Image


def run_demo(out: str | Path = "out/demo", steps: int | None = None, method: str = "ewc-dc",
             sequence: str = "tabletop-3", samples: int = 4, progress: bool = True) -> Path:
    from conceptstream import api
    from conceptstream.imaging import make_grid
    from conceptstream.methods.registry import default_steps
    from conceptstream.world.catalogue import get_sequence
    from conceptstream.world.folders import export_sequence

    out = Path(out)
    state = out / "state"
    if state.exists():
        shutil.rmtree(state)  # the demo always starts a fresh stream
    out.mkdir(parents=True, exist_ok=True)
    print(f"rendering {sequence} concept folders into {out / 'data'}")
    folders = export_sequence(get_sequence(sequence), out / "data", train_views=12, eval_views=4, progress=progress)
    steps = steps or default_steps(method)
    rows = []
    t_start = time.time()
    for n, folder in enumerate(folders):
        print(f"task {n + 1}/{len(folders)}: learning {folder.token} ({folder.noun}) with {method}")
        report = api.learn(state, folder.path, method=method if n == 0 else None, steps=steps, seed=n,
                           progress=progress)
        stream = api.open_stream(state)
        tiles, labels = [], []
        for f in folders[: n + 1]:
            tiles.append(Image.open(f.train_images()[0]).convert("RGB"))
            labels.append("real")
            imgs = stream.generate(f"a photo of a {f.token} {f.noun}", n=samples, seed=0, progress=False)
            tiles += imgs
            labels += [f.token.strip("<>")[:10]] * len(imgs)
        grid_path = out / f"after-task-{n + 1}.png"
        make_grid(tiles, cols=samples + 1, labels=labels).resize(
            ((samples + 1) * 2 * tiles[0].width, (n + 1) * 2 * (tiles[0].height + 14))).save(grid_path)
        rows.append((n + 1, report, grid_path))
        print(f"  {report.seconds:.0f}s, final loss {report.final_loss:.4f}; grid: {grid_path}")
    md = [f"# conceptstream demo: {sequence} with `{method}`", "",
          f"Bundled tiny model, {steps} steps per task, total {time.time() - t_start:.0f}s.", "",
          "| task | token | noun | seconds | final loss | grid |", "|---|---|---|---|---|---|"]
    for n, r, g in rows:
        md.append(f"| {n} | `{r.token}` | {r.noun} | {r.seconds:.0f} | {r.final_loss:.4f} | [{g.name}]({g.name}) |")
    md += ["", "Each grid row: one real training view, then samples of `a photo of a <token> <noun>`.", ""]
    md += [f"## After task {n}\n\n![after task {n}]({g.name})\n" for n, _, g in rows]
    report_path = out / "report.md"
    report_path.write_text("\n".join(md))
    return report_path
