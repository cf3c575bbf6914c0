"""Runs spread over machines: ``bench --shard K/N`` runs one slice of the runs, ``bench --merge`` joins the slices.

A shard is an ordinary bench over the K-th of N contiguous blocks of the seed-major (variant, seed)
run list (:func:`shard_slice`), in its own output folder; its ``results.json`` records
``settings.shard`` (``index``, ``count``, ``total_runs`` and the ``runs`` of its slice). The shard
is not part of a run's config, so a run computed in a shard is the same run an unsharded bench
would compute, and reruns of a shard resume like any bench.

:func:`merge_bench` reads the shard folders, refuses them unless they are the N distinct shards of
one split made under the same settings (the machine's ``device``, the model's and the data's
locations and the library versions may differ), and writes ``OUT/results.json`` with every run, the
summary and mean matrices recomputed over all seeds, and ``OUT/report.md``. ``OUT`` is
self-contained for the report: each run folder is copied without its ``state/`` (``states/`` of a
single-task bound; the large learned streams stay in the shards), and a named sequence's rendered ``data/`` is copied once.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from conceptstream.errors import UserInputError

T = TypeVar("T")

# settings that may differ between shards: where things are on each machine, not what was computed
_LOCAL_SETTINGS = ("shard", "device", "data")


def shard_slice(items: Sequence[T], index: int, count: int) -> list[T]:
    """The ``index``-th (1-based) of ``count`` contiguous blocks of ``items``; block sizes differ by at
    most one. On the seed-major run list each shard mixes methods, and N shards for N seeds are one
    seed each."""
    total = len(items)
    return list(items[(index - 1) * total // count: index * total // count])


@dataclass
class Shard:
    """One shard folder as given to ``--merge`` and its ``results.json``."""

    given: str
    dir: Path
    doc: dict[str, Any]

    @property
    def index(self) -> int:
        return int(self.doc["settings"]["shard"]["index"])

    @property
    def count(self) -> int:
        return int(self.doc["settings"]["shard"]["count"])

    @property
    def name(self) -> str:
        return f"{self.given} (shard {self.index}/{self.count})"


def merge_bench(dirs: Sequence[str | Path], out: str | Path, *, log: Callable[[str], None] | None = None
                ) -> dict[str, Any]:
    """Combine the shard folders ``dirs`` of one ``bench --shard K/N`` split into ``out``; returns the results.

    ``out/results.json`` lists every run of every shard with the summary recomputed over all seeds;
    ``complete`` is true only when every shard is. It records ``merged_from`` (each shard's folder
    relative to ``out``, its slice, time, device and library versions). ``out`` must be new, empty or
    an earlier merge (which is replaced); nothing is written unless every check passes.
    """
    from conceptstream.evaluation.bench.results import clean_json
    from conceptstream.evaluation.report import write_report
    from conceptstream.safeio import write_json_atomic

    log = log or _print
    if not dirs:
        raise UserInputError("--merge needs the output folders of the shards: --merge DIR [DIR ...] --out OUT")
    out = Path(out)
    shards = sorted((_read_shard(d) for d in dirs), key=lambda sh: sh.index)
    _check_split(shards)
    _check_settings(shards)
    runs = _collect_runs(shards)
    _check_out(out, shards)

    doc = _merged_doc(shards, runs, out)
    tmp = out.parent / f".{out.name}.merging-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        settings = shards[0].doc["settings"]
        if settings.get("named_sequence"):  # rendered into the shard's out; the report shows held-out views
            src = shards[0].dir / settings["data"]
            if src.is_dir():
                shutil.copytree(src, tmp / settings["data"])
        for (_, _), (shard, run) in runs.items():
            _copy_run(shard.dir / run["run_dir"], tmp / run["run_dir"])
        write_json_atomic(tmp / "results.json", doc)
        report = write_report(doc, tmp)
        doc["report"] = report.relative_to(tmp).as_posix()
        write_json_atomic(tmp / "results.json", doc)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if any(sh.doc.get("versions") != shards[0].doc.get("versions") for sh in shards):
        log("[bench] note: the shards ran with different library versions; results.json records each shard's "
            "under merged_from")
    log(f"[bench] merged {len(shards)} shard(s), {len(runs)} run(s) into {out}"
        + ("" if doc["complete"] else " (incomplete: some runs have not finished or failed)")
        + f"; report: {out / doc['report']}")
    return clean_json(doc)


def _print(line: str) -> None:
    print(line, flush=True)


# ------------------------------------------------------------------------------ reading and checks


def _read_shard(given: str | Path) -> Shard:
    from conceptstream.evaluation.bench.results import FORMAT_VERSION, RESULTS_FORMAT

    folder = Path(given)
    path = folder / "results.json"
    if not folder.is_dir():
        raise UserInputError(f"--merge {given}: no such folder; give the --out folder of each shard")
    if not path.is_file():
        raise UserInputError(f"--merge {given}: no results.json there; that shard has not finished a run yet "
                             "(run it, then merge)")
    try:
        doc = json.loads(path.read_text())
    except ValueError as exc:
        raise UserInputError(f"--merge {path} is not valid JSON ({exc}); rerun that shard to rewrite it") from None
    if not isinstance(doc, dict) or doc.get("format") != RESULTS_FORMAT:
        raise UserInputError(f"--merge {path} is not a conceptstream bench result")
    if doc.get("format_version") != FORMAT_VERSION:
        raise UserInputError(f"--merge {path} has format version {doc.get('format_version')}, this conceptstream "
                             f"reads {FORMAT_VERSION}; rerun that shard with this version")
    shard = (doc.get("settings") or {}).get("shard")
    if not isinstance(shard, dict) or not {"index", "count", "runs"} <= set(shard):
        raise UserInputError(f"--merge {given}: not a shard (that bench ran without --shard K/N); merge the "
                             "output folders of `conceptstream bench --shard K/N` runs")
    return Shard(str(given), folder, doc)


def _check_split(shards: list[Shard]) -> None:
    counts = sorted({sh.count for sh in shards})
    if len(counts) > 1:
        raise UserInputError("--merge: the folders are shards of different splits ("
                             + ", ".join(sh.name for sh in shards) + "); merge the N shards of one split")
    count = counts[0]
    seen: dict[int, Shard] = {}
    for sh in shards:
        if sh.index in seen:
            raise UserInputError(f"--merge: {seen[sh.index].given} and {sh.given} are both shard {sh.index}/{count}; "
                                 "give each shard once")
        seen[sh.index] = sh
    missing = [f"{k}/{count}" for k in range(1, count + 1) if k not in seen]
    if missing:
        raise UserInputError(f"--merge: shard(s) {', '.join(missing)} missing (given: "
                             + ", ".join(sh.name for sh in shards) + "); give the folders of all "
                             f"{count} shards")


def _comparable(shard: Shard) -> dict[str, Any]:
    """What must be equal in every shard: the settings but for the local ones, the model's fingerprint
    (not its path), the data's fingerprint (and, for a user's folder, not the path it was given as),
    the metric definitions and T2I availability."""
    doc = shard.doc
    settings = {k: v for k, v in doc["settings"].items() if k not in _LOCAL_SETTINGS}
    settings["model"] = (settings.get("model") or {}).get("fingerprint")
    if not settings.get("named_sequence"):
        settings.pop("sequence", None)
    return {**settings, "metrics": doc.get("metrics"), "t2i": doc.get("t2i"),
            "summary_keys": doc.get("summary_keys")}


def _check_settings(shards: list[Shard]) -> None:
    first = _comparable(shards[0])
    for sh in shards[1:]:
        other = _comparable(sh)
        keys = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if keys:
            raise UserInputError(f"--merge: {sh.name} was made under other settings than {shards[0].name} "
                                 f"({', '.join(keys)} differ); rerun it with the same options as the other shards")


def _collect_runs(shards: list[Shard]) -> dict[tuple[str, int], tuple[Shard, dict[str, Any]]]:
    """Every finished run, by (label, seed), in seed-major order; each shard must hold only its own slice."""
    settings = shards[0].doc["settings"]
    planned = [(label, int(seed)) for seed in settings["seeds"] for label in settings["methods"]]
    found: dict[tuple[str, int], tuple[Shard, dict[str, Any]]] = {}
    for sh in shards:
        recorded = [(r["label"], int(r["seed"])) for r in sh.doc["settings"]["shard"]["runs"]]
        if recorded != shard_slice(planned, sh.index, sh.count):
            raise UserInputError(f"--merge: {sh.name} lists runs that are not slice {sh.index}/{sh.count} of this "
                                 "bench's runs (made by another conceptstream version?); rerun that shard")
        for label, entry in sh.doc.get("runs", {}).items():
            for seed, run in entry.get("seeds", {}).items():
                key = (label, int(seed))
                if key in found:
                    raise UserInputError(f"--merge: {label} seed {seed} is in both {found[key][0].name} and "
                                         f"{sh.name}; give each shard once")
                if key not in recorded:
                    raise UserInputError(f"--merge: {sh.name} holds {label} seed {seed}, which is not in its slice; "
                                         "rerun that shard in a fresh --out")
                if not (sh.dir / run["run_dir"] / "result.json").is_file():
                    raise UserInputError(f"--merge: {sh.dir / run['run_dir'] / 'result.json'} is missing; merge "
                                         "the shard folders as the bench wrote them")
                found[key] = (sh, run)
    return {key: found[key] for key in planned if key in found}


def _check_out(out: Path, shards: list[Shard]) -> None:
    target = out.resolve()
    for sh in shards:
        where = sh.dir.resolve()
        if target == where or where in target.parents or target in where.parents:
            raise UserInputError(f"--out {out} overlaps the shard folder {sh.given}; give a new folder for the "
                                 "merged results")
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} is a file; give a new folder for the merged results")
    if out.is_dir() and any(out.iterdir()) and not _is_merge(out):
        raise UserInputError(f"--out {out} already holds other files; give a new folder for the merged results "
                             "(an earlier merge there would be replaced)")


def _is_merge(folder: Path) -> bool:
    try:
        return "merged_from" in json.loads((folder / "results.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


# ------------------------------------------------------------------------------ the merged folder


def _relative(path: Path, out: Path) -> str:
    try:
        return Path(os.path.relpath(path.resolve(), out.resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return str(path)


def _merged_doc(shards: list[Shard], runs: dict[tuple[str, int], tuple[Shard, dict[str, Any]]], out: Path
                ) -> dict[str, Any]:
    """The merged ``results.json``: the layout of :func:`~.results.compile_results` over every shard's runs."""
    from conceptstream.evaluation.bench.results import FORMAT_VERSION, RESULTS_FORMAT, mean_matrices
    from conceptstream.evaluation.matrices import aggregate_over_seeds
    from conceptstream.system import utc_now

    first = shards[0].doc
    settings = {k: v for k, v in first["settings"].items() if k != "shard"}
    if not settings.get("named_sequence"):  # a user's folder stays where it is
        settings["data"] = _relative(shards[0].dir / settings["data"], out)
    devices = {json.dumps(sh.doc["settings"].get("device")) for sh in shards}
    if len(devices) > 1:
        settings["device"] = "per shard (see merged_from)"
    merged_runs: dict[str, dict[str, Any]] = {}
    summary: dict[str, dict[str, Any]] = {}
    for label in settings["methods"]:
        base = next(sh.doc["runs"][label] for sh in shards if label in sh.doc.get("runs", {}))
        seeds = {str(seed): run for (lb, seed), (_, run) in runs.items() if lb == label}
        merged_runs[label] = {**base, "seeds": seeds,
                              "mean_matrices": mean_matrices([r["matrices"] for r in seeds.values()])}
        summary[label] = aggregate_over_seeds([r["summary"] for r in seeds.values()]) if seeds else {}
    failed = [{**f, "shard": _relative(sh.dir, out)} for sh in shards for f in sh.doc.get("failed", [])]
    total = int(first["settings"]["shard"].get("total_runs") or
                len(settings["methods"]) * len(settings["seeds"]))
    return {
        "format": RESULTS_FORMAT, "format_version": FORMAT_VERSION, "updated_at": utc_now(),
        "complete": all(sh.doc.get("complete") for sh in shards) and not failed and len(runs) == total,
        "wall_seconds": round(sum(sh.doc.get("wall_seconds") or 0.0 for sh in shards), 3),
        "settings": settings,
        "metrics": first.get("metrics"),
        "t2i": first.get("t2i"),
        "versions": first.get("versions", {}),
        "summary_keys": first.get("summary_keys"),
        "summary": summary,
        "runs": merged_runs,
        "failed": failed,
        "merged_from": [{"dir": _relative(sh.dir, out), "shard": f"{sh.index}/{sh.count}",
                         "runs": sh.doc["settings"]["shard"]["runs"], "complete": sh.doc.get("complete"),
                         "wall_seconds": sh.doc.get("wall_seconds"), "updated_at": sh.doc.get("updated_at"),
                         "device": sh.doc["settings"].get("device"),
                         "model": (sh.doc["settings"].get("model") or {}).get("reference"),
                         "versions": sh.doc.get("versions")} for sh in shards],
    }


_STATE_FOLDERS = ("state", "states")  # a run's learned stream; a single-task bound's one state per concept


def _copy_run(src: Path, dst: Path) -> None:
    """A run folder without its learned states (large, and not read by the report)."""
    shutil.copytree(src, dst, ignore=lambda folder, names: [n for n in names if n in _STATE_FOLDERS]
                    if Path(folder) == src else [])


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out``, replacing an earlier merge (or an empty folder) there."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.replaced-{os.getpid()}"
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
