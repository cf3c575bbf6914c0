"""The bench: every (variant, seed) run in seed-major order, ``results.json`` after each, the report at the end.

With ``shard=(K, N)`` a bench runs only the K-th of N slices of that list (:mod:`~.merge`).
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conceptstream.errors import StateError, UserInputError
from conceptstream.evaluation.bench.bounds import run_class
from conceptstream.evaluation.bench.context import BenchContext
from conceptstream.evaluation.bench.data import prepare_data
from conceptstream.evaluation.bench.merge import shard_slice
from conceptstream.evaluation.bench.options import BENCH_OPTIONS
from conceptstream.evaluation.bench.results import compile_results
from conceptstream.evaluation.bench.run import BenchRun
from conceptstream.evaluation.bench.scoring import Evaluator
from conceptstream.evaluation.bench.settings import resolve_settings
from conceptstream.evaluation.variants import expand_variants


class Bench:
    def __init__(self, settings, log: Callable[[str], None] = print) -> None:
        self.s = settings
        self.log = log

    def setup(self) -> None:
        """Expand the variants and list the runs (this shard's), render or read the data, load the feature extractor."""
        from conceptstream.evaluation.features import FeatureExtractor, get_feature_extractor
        from conceptstream.models.loading import model_fingerprint, resolve_model

        s = self.s
        self.variants = expand_variants(s.methods, s.adapter, s.sweep)
        # Seed-major: every method's first seed runs before any second seed, so a campaign cut short
        # (or still running) already compares all methods.
        planned = [(v, k) for k in s.seeds for v in self.variants]
        self.total_runs = len(planned)
        if s.shard is not None:
            self._check_shard(len(planned))
            planned = shard_slice(planned, *s.shard)
        s.out.mkdir(parents=True, exist_ok=True)
        data = prepare_data(s.sequence, s.out, s.train_views, s.eval_views, s.max_concepts, s.progress, self.log,
                            val_views=s.val_views, split=s.split)
        resolve_model(s.model)
        model_info = {"reference": s.model, "fingerprint": model_fingerprint(s.model)}
        extractor = s.features if isinstance(s.features, FeatureExtractor) else get_feature_extractor(s.features)
        self.ctx = BenchContext(settings=s, data=data, extractor=extractor, evaluator=Evaluator(s, data, extractor),
                                model_info=model_info, sampler=self._sampler_name(), log=self.log)
        self.runs = [run_class(v)(self.ctx, v, k) for v, k in planned]

    def _check_shard(self, total: int) -> None:
        """A shard of more slices than runs is empty; a shard's out must not hold another shard's (or a
        whole bench's) results: each shard writes its own ``results.json``."""
        s = self.s
        index, count = s.shard
        if count > total:
            raise UserInputError(f"--shard {index}/{count}: the bench has only {total} run(s) "
                                 f"({len(self.variants)} variant(s) x {len(s.seeds)} seed(s)); use at most "
                                 f"{total} shards")
        path = s.out / "results.json"
        try:
            saved = json.loads(path.read_text()).get("settings", {}).get("shard") if path.is_file() else False
        except (OSError, ValueError, AttributeError):
            saved = False
        if saved is False:
            return
        have = (saved.get("index"), saved.get("count")) if isinstance(saved, dict) else None
        if have != (index, count):
            what = f"shard {have[0]}/{have[1]}" if have else "a bench that ran without --shard"
            raise UserInputError(f"--out {s.out} holds the results of {what}; give each shard its own --out, then "
                                 "combine them with `conceptstream bench --merge DIR... --out OUT`")

    def shard_record(self) -> dict[str, Any] | None:
        """``settings.shard`` of this bench's results.json (None when it is not a shard)."""
        if self.s.shard is None:
            return None
        index, count = self.s.shard
        return {"index": index, "count": count, "total_runs": self.total_runs,
                "runs": [{"label": r.variant.label, "seed": r.seed} for r in self.runs]}

    def _sampler_name(self) -> str:
        from conceptstream.models.loading import resolve_model

        cfg = Path(resolve_model(self.s.model)) / "scheduler" / "scheduler_config.json"
        if cfg.is_file():
            return json.loads(cfg.read_text()).get("_class_name", "unknown")
        return "the pipeline's scheduler"

    def run(self) -> dict[str, Any]:
        t0 = time.time()
        self.setup()
        s = self.s
        steps = f"{s.steps} steps" if s.steps else "each method's default steps"
        self.log(f"[bench] {len(self.variants)} variant(s) x {len(s.seeds)} seed(s) on {len(self.ctx.data.concepts)} "
                 f"concepts ({s.sequence}), {steps} per task; output in {s.out}")
        if s.shard is not None:
            self.log(f"[bench] shard {s.shard[0]}/{s.shard[1]}: {len(self.runs)} of the {self.total_runs} runs ("
                     + ", ".join(r.name for r in self.runs) + ")")
        results: dict[tuple[str, int], dict] = {}
        failed: list[dict[str, Any]] = []
        for k, run in enumerate(self.runs, 1):
            where = f"[bench {k}/{len(self.runs)}] {run.name}"
            done = run.finished()
            if done is not None:
                self.log(f"{where}: finished earlier, skipped")
                results[(run.variant.label, run.seed)] = done
                continue
            self.log(f"{where}: starting ({run.dir})")
            try:
                results[(run.variant.label, run.seed)] = run.run(k, len(self.runs))
            except (KeyboardInterrupt, StateError):
                raise
            except Exception as exc:
                if not s.keep_going:
                    raise
                failed.append(self._failure(run, exc))
                self.log(f"{where}: FAILED ({failed[-1]['error']}); continuing with the next run (rerun the same "
                         "command to retry)")
            self._write(results, failed, time.time() - t0, final=False)
        return self._write(results, failed, time.time() - t0, final=True)

    @staticmethod
    def _failure(run: BenchRun, exc: Exception) -> dict[str, Any]:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return {"label": run.variant.label, "seed": run.seed, "run": run.rel(run.dir),
                "error": f"{type(exc).__name__}: {first}", "traceback": traceback.format_exc(limit=8)}

    def _write(self, results: dict, failed: list, wall: float, final: bool) -> dict[str, Any]:
        from conceptstream.safeio import write_json_atomic

        doc = compile_results(self.ctx, self.variants, len(self.runs), results, failed, wall)
        shard = self.shard_record()
        if shard is not None:  # only this slice's methods; settings.shard tells --merge which runs it holds
            labels = {r.variant.label for r in self.runs}
            doc["runs"] = {k: v for k, v in doc["runs"].items() if k in labels}
            doc["summary"] = {k: v for k, v in doc["summary"].items() if k in labels}
            doc["settings"]["shard"] = shard
        write_json_atomic(self.s.out / "results.json", doc)
        if final:
            from conceptstream.evaluation.report import write_report

            report = write_report(doc, self.s.out)
            doc["report"] = report.relative_to(self.s.out).as_posix()
            write_json_atomic(self.s.out / "results.json", doc)
            self.log(f"[bench] results: {self.s.out / 'results.json'}; report: {report}")
        return doc


def run_bench(out: str | Path, *, log: Callable[[str], None] | None = None, **options: Any) -> dict[str, Any]:
    """Run the benchmark and write ``out/results.json`` and ``out/report.md``; returns the results.

    ``options`` are the names of :data:`~conceptstream.evaluation.bench.options.BENCH_OPTIONS` (listed
    below); an option left out or None takes its default, or its ``--quick`` value with ``quick=True``.
    ``sequence``: a named sequence (``tabletop-3/6/10/50``, rendered into ``out/data``) or a sequence
    folder. ``methods``: a list or a comma-separated string. ``seeds``: a count (seeds 0..n-1) or
    explicit seeds. ``sweep``: ``{"ewc_lambda": [1, 10]}`` or CLI-style ``["ewc_lambda=1,10"]``.
    ``hparams``: fixed method settings (``{"dsc_iters": 50}`` or ``["dsc_iters=50"]``), applied to
    every method that has them. ``features``: an extractor spec or a ``FeatureExtractor``.
    ``eval_every``: score every seen concept only after every K-th task and the last (long streams:
    the full matrix costs O(N^2) generations); the new concept is scored after every task, so A, BwT
    and plasticity are exact and forgetting uses the rows that were scored. ``keep_going``: a failing
    run is recorded and the bench goes on. ``shard``: ``"K/N"`` or ``(K, N)``, 1 <= K <= N: run
    only the K-th of N contiguous slices of the seed-major run list, in its own ``out``; combine the
    shards' folders with :func:`merge_bench`.
    """
    settings = resolve_settings(out, options)
    return Bench(settings, log or _print).run()


def _print(line: str) -> None:
    print(line, flush=True)


def _option_lines(options) -> str:
    lines = []
    for o in options:
        if o.name == "out":
            continue
        if o.action == "store_false":
            lines.append(f"    - ``{o.name}`` (default True; ``{o.cli_flag}`` sets False): {o.help}")
        else:
            lines.append(f"    - ``{o.name}``: {o.help_text()}")
    return "\n".join(lines)


run_bench.__doc__ = (run_bench.__doc__ or "") + "\n    Options:\n\n" + _option_lines(BENCH_OPTIONS) + "\n"

