"""Copy a bench output folder's results into the repository (``benchmarks/results/<name>/``).

Rewrites the report from ``results.json`` with the current report code, then copies
``results.json``, ``report.md``, the report's figures and the run files it links to (the
multi-concept samples).
Run outputs (states, per-task samples, logs) stay behind: they are large and rebuildable.

    python benchmarks/publish.py bench/tabletop-6-lora benchmarks/results/tabletop-6-lora
    python benchmarks/publish.py bench/v2-tabletop-6-lora benchmarks/results/v2-tabletop-6-lora \
        --snippet --command "STAGES=t6-v2 bash benchmarks/run_tabletop.sh"

``--snippet`` also prints the README block of that result: what it was run on (split, model, adapter,
steps, seeds) and how to rerun it, the summary table over seeds and the paired tables.
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


def snippet(doc: dict, dst: Path, command: str) -> str:
    """The README block of one published result: provenance line, summary table, paired tables."""
    from conceptstream.evaluation.report import paired_note, paired_references, paired_table, steps_text, summary_table

    s = doc["settings"]
    lines = [f"Split **{s.get('split', 'test')}**, `{s['sequence']}` ({len(s['concepts'])} concepts), base model "
             f"`{s['model']['reference']}` (fingerprint `{s['model']['fingerprint']}`), adapter `{s['adapter']}`, "
             f"{steps_text(s)}, seeds {s['seeds']}"
             + ("" if doc.get("complete") else " (**incomplete**: finished runs only)")
             + f". Reproduce: `{command}`; full report: `{dst.as_posix()}/report.md`.", "",
             *summary_table(doc), ""]
    for reference in paired_references(doc):
        table = paired_table(doc, reference)
        if table:
            lines += [f"Paired with `{reference}` (same seed). {paired_note(doc, reference)}", "", *table, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="a bench --out folder")
    p.add_argument("dst", type=Path, help="where in the repository, e.g. benchmarks/results/tabletop-6-lora")
    p.add_argument("--snippet", action="store_true", help="also print the README block of this result")
    p.add_argument("--command", default="conceptstream bench ...", help="--snippet: the command that reproduces it")
    args = p.parse_args()
    print(f"{args.dst}: {publish(args.src, args.dst):.1f} MB")
    if args.snippet:
        print(snippet(json.loads((args.dst / "results.json").read_text()), args.dst, args.command))
