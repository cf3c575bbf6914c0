"""Carry a campaign's finished bench runs across sessions whose work dirs are lost.

A bench skips every run whose ``runs/<variant>/seed<k>/result.json`` exists with the current config
(:meth:`conceptstream.evaluation.bench.run.BenchRun.finished`), so those files are all a later session needs
to resume a stage. ``save`` copies them (and, with ``--images``, the first seed's sample strips and
multi-concept samples, which the report's grids show; not those of the tuning benches, never published)
from a campaign folder into a folder that is committed; ``restore`` copies them back before the stage
is rerun. Only scores and generated samples travel: no training image, latent or feature of a concept,
no model state (a run that was cut off restarts).

    python benchmarks/carry.py save bench benchmarks/carried [--images]
    python benchmarks/carry.py restore benchmarks/carried bench

``restore`` never overwrites a file that exists; ``save`` replaces a carried file whose run was recomputed
(the campaign folder is the truth). Once a stage is published (benchmarks/publish.py), its
carried runs can be deleted.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

IMAGE_SEED = "seed0"  # the report's grids show each variant's first seed


def finished_files(root: Path, images: bool) -> Iterator[Path]:
    """Every finished run's ``result.json`` under ``root`` (and with ``images`` its first seed's samples); not
    those of a bench merged from shards (``NAME`` beside ``NAME.shards``): the merge is redone from the shards."""
    for result in sorted(root.rglob("runs/*/seed*/result.json")):
        bench = result.parents[3]
        if bench.with_name(bench.name + ".shards").is_dir():
            continue
        yield result
        if images and result.parent.name == IMAGE_SEED and "tuning" not in result.relative_to(root).parts:
            for sub in ("samples", "multi"):
                yield from sorted((result.parent / sub).glob("*.png"))


def copy_files(files: Sequence[Path], src: Path, dst: Path, replace: bool) -> int:
    """Copy each of ``files`` (under ``src``) to the same place under ``dst``: where it exists there only with
    ``replace`` and other contents (a run recomputed in the campaign folder replaces its carried copy)."""
    count = 0
    for f in files:
        target = dst / f.relative_to(src)
        if target.exists() and (not replace or target.read_bytes() == f.read_bytes()):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        shutil.copyfile(f, tmp)
        tmp.replace(target)  # a run cut off mid-copy leaves no half file that looks finished
        count += 1
    return count


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("save", "restore"))
    p.add_argument("src", type=Path, help="save: the campaign folder; restore: the carried folder")
    p.add_argument("dst", type=Path, help="save: the carried folder; restore: the campaign folder")
    p.add_argument("--images", action="store_true",
                   help="save: also the first seed's sample strips and multi-concept samples (for the report grids)")
    args = p.parse_args(argv)
    if not args.src.is_dir():
        if args.action == "restore":
            print(f"[carry] nothing to restore: {args.src} does not exist")
            return 0
        p.error(f"{args.src} is not a folder; give the campaign folder (the OUT of benchmarks/run_tabletop.sh)")
    if args.action == "save":
        files = list(finished_files(args.src, args.images))
    else:
        files = sorted(f for f in args.src.rglob("*") if f.is_file() and not f.name.endswith(".part"))
    count = copy_files(files, args.src, args.dst, replace=args.action == "save")
    runs = sum(1 for f in files if f.name == "result.json")
    print(f"[carry] {args.action}: {runs} finished run(s) in {args.src}; wrote {count} file(s) to {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
