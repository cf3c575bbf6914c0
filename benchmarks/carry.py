"""Carry a campaign's bench runs across sessions whose work dirs are lost.

A bench skips every run whose ``runs/<variant>/seed<k>/result.json`` exists with the current config
(:meth:`conceptstream.evaluation.bench.run.BenchRun.finished`), so those files are all a later session needs
to resume a stage. ``save`` copies them (and, with ``--images``, the first seed's sample strips and
multi-concept samples, which the report's grids show; not those of the tuning benches, never published)
from a campaign folder into a folder that is committed; ``restore`` copies them back before the stage
is rerun. Only scores, generated samples and (``--partial``) learned states travel: no training image,
latent or feature of a concept.

With ``--partial`` a run that has not finished is carried too, so a long run (tabletop-50's take hours)
resumes after the task it had reached instead of restarting: its ``progress.json``, task logs and samples, its
state's live generation (``CURRENT`` and the files it names; what ``conceptstream learn`` wrote: tokens,
adapter, method tensors) and, once all tasks are done, the concepts its final DC classification has classified
(scalar denoising errors per held-out image and candidate). The snapshot is taken again if the run moved on
while it was copied, and replaces the carried one whole. ``restore`` brings a carried unfinished run back only
into a work dir that has no progress of that run; once the run finishes, ``save`` replaces its carried
snapshot by its ``result.json``.

    python benchmarks/carry.py save bench benchmarks/carried [--images] [--partial]
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
PROGRESS, RESULT, CURRENT = "progress.json", "result.json", "CURRENT"
DC_PARTIAL = "dc_partial.safetensors"  # the final DC classification so far (BenchRun.dc_checkpoint)


def _merged(bench: Path) -> bool:
    """A bench merged from shards (``NAME`` beside ``NAME.shards``): the merge is redone from the shards."""
    return bench.with_name(bench.name + ".shards").is_dir()


def _carries_images(run: Path, root: Path, images: bool) -> bool:
    """Whether a run's samples travel: with ``images``, the first seed's, never a tuning bench's."""
    return images and run.name == IMAGE_SEED and "tuning" not in run.relative_to(root).parts


def finished_files(root: Path, images: bool) -> Iterator[Path]:
    """Every finished run's ``result.json`` under ``root`` (and with ``images`` its first seed's samples); not
    those of a bench merged from shards."""
    for result in sorted(root.rglob(f"runs/*/seed*/{RESULT}")):
        if _merged(result.parents[3]):
            continue
        yield result
        if _carries_images(result.parent, root, images):
            for sub in ("samples", "multi"):
                yield from sorted((result.parent / sub).glob("*.png"))


def unfinished_runs(root: Path) -> Iterator[Path]:
    """The run folders under ``root`` that have progress but no result (not those of a merged bench)."""
    for progress in sorted(root.rglob(f"runs/*/seed*/{PROGRESS}")):
        run = progress.parent
        if not (run / RESULT).exists() and not _merged(run.parents[2]):
            yield run


def run_of(rel: Path) -> Path | None:
    """The ``.../runs/<variant>/seed<k>`` folder a relative path lies in, None outside any run."""
    parts = rel.parts
    for i in range(len(parts) - 3):
        if parts[i] == "runs" and parts[i + 2].startswith("seed"):
            return Path(*parts[: i + 3])
    return None


def _marker(run: Path) -> tuple[bytes | None, str | None, bytes | None]:
    """What says how far a run has got: its progress file, the state generation ``CURRENT`` names and its
    final DC classification so far."""
    def read(path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
    current = read(run / "state" / CURRENT)
    return read(run / PROGRESS), None if current is None else current.decode().strip(), read(run / DC_PARTIAL)


def snapshot_files(run: Path, samples: bool) -> list[Path]:
    """What resumes an unfinished run: its progress, task logs, (``samples``) sample strips, its state's
    live generation (never the lock, older generations or an in-task checkpoint: the task restarts) and the
    concepts its final DC classification has done (scalar errors per image and candidate)."""
    files = [run / PROGRESS, *sorted((run / "logs").glob("*.json"))]
    if (run / DC_PARTIAL).is_file():
        files.append(run / DC_PARTIAL)
    if samples:
        files += sorted((run / "samples").glob("*.png"))
    generation = _marker(run)[1]
    if generation is not None:
        files += [run / "state" / CURRENT, *sorted(p for p in (run / "state" / generation).iterdir() if p.is_file())]
    return files


def snapshot_run(run: Path, target: Path, samples: bool, attempts: int = 5) -> bool:
    """Carry unfinished ``run`` to ``target``, replacing the snapshot there whole; False when it is current.
    Copied again while the run moves on (a task learned or evaluated meanwhile), so the progress and the
    state always belong together."""
    for _attempt in range(attempts):
        before = _marker(run)
        if not (target / RESULT).exists() and _marker(target) == before:
            return False
        tmp = target.with_name(target.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for f in snapshot_files(run, samples):
                dst = tmp / f.relative_to(run)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dst)
        except FileNotFoundError:  # an old generation deleted under us: the run committed a new one
            continue
        if _marker(run) != before:
            continue
        shutil.rmtree(target, ignore_errors=True)
        tmp.replace(target)
        return True
    shutil.rmtree(target.with_name(target.name + ".part"), ignore_errors=True)
    raise RuntimeError(f"{run} kept changing while it was copied; save again")


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


def save(src: Path, dst: Path, images: bool, partial: bool) -> str:
    files = list(finished_files(src, images))
    for result in files:  # a run carried unfinished and finished since: its snapshot gives way to the result
        carried = dst / result.parent.relative_to(src)
        if result.name == RESULT and (carried / PROGRESS).exists():
            shutil.rmtree(carried)
    count = copy_files(files, src, dst, replace=True)
    line = f"{sum(1 for f in files if f.name == RESULT)} finished run(s) in {src}; wrote {count} file(s) to {dst}"
    if partial:
        runs = list(unfinished_runs(src))
        copied = sum(snapshot_run(run, dst / run.relative_to(src), _carries_images(run, src, images)) for run in runs)
        line += f"; {len(runs)} unfinished run(s), {copied} snapshot(s) taken"
    return line


def restore(src: Path, dst: Path) -> str:
    files, skipped = [], set()
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if not f.is_file() or any(part.endswith(".part") for part in rel.parts):
            continue
        run = run_of(rel)
        if run is not None and not (src / run / RESULT).exists():  # a carried unfinished run: all or nothing
            if run in skipped or (dst / run / PROGRESS).exists() or (dst / run / RESULT).exists():
                skipped.add(run)
                continue
        files.append(f)
    count = copy_files(files, src, dst, replace=False)
    unfinished = {run_of(f.relative_to(src)) for f in files if f.name == PROGRESS}
    return (f"{sum(1 for f in files if f.name == RESULT)} finished run(s) in {src}; wrote {count} file(s) to {dst}"
            + (f"; {len(unfinished)} unfinished run(s) restored" if unfinished else "")
            + (f", {len(skipped)} left to the work dir's own progress" if skipped else ""))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("save", "restore"))
    p.add_argument("src", type=Path, help="save: the campaign folder; restore: the carried folder")
    p.add_argument("dst", type=Path, help="save: the carried folder; restore: the campaign folder")
    p.add_argument("--images", action="store_true",
                   help="save: also the first seed's sample strips and multi-concept samples (for the report grids)")
    p.add_argument("--partial", action="store_true",
                   help="save: also snapshot unfinished runs (progress, logs and the state), so they resume")
    args = p.parse_args(argv)
    if not args.src.is_dir():
        if args.action == "restore":
            print(f"[carry] nothing to restore: {args.src} does not exist")
            return 0
        p.error(f"{args.src} is not a folder; give the campaign folder (the OUT of benchmarks/run_tabletop.sh)")
    line = save(args.src, args.dst, args.images, args.partial) if args.action == "save" else restore(args.src, args.dst)
    print(f"[carry] {args.action}: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
