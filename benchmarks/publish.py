"""Copy a bench output folder's results into the repository (``benchmarks/results/<name>/``).

Rewrites the report from ``results.json`` with the current report code, then copies
``results.json``, ``report.md``, the report's figures and the run files it links to (the
multi-concept samples).
Run outputs (states, per-task samples, logs) stay behind: they are large and rebuildable.

    python benchmarks/publish.py bench/tabletop-6-lora benchmarks/results/tabletop-6-lora
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path
from urllib.parse import unquote


def publish(src: Path, dst: Path) -> float:
    """Returns the size of what was published, in MB."""
    from conceptstream.evaluation.report import write_report

    write_report(json.loads((src / "results.json").read_text()), src)
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "report.md"):
        shutil.copy(src / name, dst / name)
    if (dst / "report").exists():
        shutil.rmtree(dst / "report")
    shutil.copytree(src / "report", dst / "report")
    for link in re.findall(r"\]\((runs/[^)]+)\)", (src / "report.md").read_text()):  # multi-concept samples
        target = dst / unquote(link)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / unquote(link), target)
    return sum(f.stat().st_size for f in dst.rglob("*") if f.is_file()) / 1e6


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="a bench --out folder")
    p.add_argument("dst", type=Path, help="where in the repository, e.g. benchmarks/results/tabletop-6-lora")
    args = p.parse_args()
    print(f"{args.dst}: {publish(args.src, args.dst):.1f} MB")
