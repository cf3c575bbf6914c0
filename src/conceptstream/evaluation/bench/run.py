"""One bench run, a (variant, seed): learn the sequence task by task, score after every task; resumable.

Files in ``OUT/runs/<variant>/seed<k>/``: ``state/`` (the stream, committed by
:func:`conceptstream.api.learn`), ``progress.json`` (the config and one entry per evaluated task),
``logs/``, ``samples/``, ``multi/`` and, once finished, ``result.json``. A saved run whose config
differs from the current one is refused (:meth:`BenchRun.config`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from conceptstream.errors import StateError
from conceptstream.evaluation.bench.context import BenchContext
from conceptstream.evaluation.bench.options import BENCH_OPTIONS
from conceptstream.evaluation.bench.results import (
    FORMAT_VERSION,
    METRICS,
    RESULTS_FORMAT,
    clean_json,
    matrix_from_rows,
    mean,
    run_summary,
)
from conceptstream.evaluation.bench.scoring import hstack
from conceptstream.evaluation.variants import Variant
from conceptstream.system import memory_usage, utc_now


def learn_seed(seed: int, task: int) -> int:
    """The training seed of task ``task`` (0-based) in the run of bench seed ``seed``."""
    return 1000 * seed + task


def _diff_keys(a: Mapping, b: Mapping) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _fmt(x: float | None, nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _tqdm(iterable, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, leave=False, **kwargs)


class BenchRun:
    """One (variant, seed): learn the whole sequence, evaluating after every task; resumable."""

    def __init__(self, ctx: BenchContext, variant: Variant, seed: int) -> None:
        self.ctx = ctx
        self.variant = variant
        self.seed = seed
        self.dir = ctx.settings.out / "runs" / variant.dirname / f"seed{seed}"
        self.state = self.dir / "state"
        self.progress_path = self.dir / "progress.json"
        self.result_path = self.dir / "result.json"
        self.dc_checkpoint = self.dir / "dc_partial.safetensors"  # the final DC classification so far; see finish
        self.prefix = self.name

    @property
    def name(self) -> str:
        return f"{self.variant.label} seed {self.seed}"

    def rel(self, path: Path) -> str:
        return path.relative_to(self.ctx.settings.out).as_posix()

    # -- what the run is ----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """What determines this run's numbers; a saved run with a different config is refused.

        The options declared with ``check="run"`` enter under their own names (at their default
        left out where ``omit_default``: runs saved before the option existed stay valid)."""
        ctx, s = self.ctx, self.ctx.settings
        declared = {o.name: getattr(s, o.name) for o in BENCH_OPTIONS if o.check == "run"
                    and not (o.omit_default and getattr(s, o.name) == o.default)}
        return clean_json({
            "method": self.variant.method, "adapter": self.variant.adapter,
            "hparams": self.hparams(), "settings": self.effective_hparams(), "seed": self.seed,
            "learn_seeds": "1000 * seed + task index",
            "model": ctx.model_info["fingerprint"], "data": {"tokens": [c.token for c in ctx.data.concepts],
                                                            "fingerprint": ctx.data.fingerprint},
            "generation": ctx.generation_settings(), "features": ctx.extractor.name,
            **declared,
        })

    def hparams(self) -> dict[str, Any]:
        """Method settings passed to learn: the bench's fixed ones this method has, then the swept ones."""
        from conceptstream.methods.registry import get_method

        known = get_method(self.variant.method).all_defaults()
        return {**{k: v for k, v in self.ctx.settings.hparams.items() if k in known}, **dict(self.variant.hparams)}

    def effective_hparams(self) -> dict[str, Any]:
        """Every method setting the run uses, defaults included: a saved run made under other defaults
        (the library's defaults changed since) is refused rather than silently reused."""
        from conceptstream.methods.registry import method_defaults

        return {**method_defaults(self.variant.method, self.variant.adapter), **self.hparams()}

    def full_row(self, n: int, n_tasks: int) -> bool:
        """Whether every seen concept is scored after task ``n`` (0-based), or only the new one."""
        every = self.ctx.settings.eval_every
        return every <= 1 or (n + 1) % every == 0 or n == n_tasks - 1

    def state_for(self, n: int) -> Path:
        """The state that learns task ``n`` and is scored after it (one state for a continual run)."""
        return self.state

    def creates_state(self, n: int) -> bool:
        """Whether task ``n`` starts a new state (its adapter, rank, targets and method settings are set then)."""
        return n == 0

    # -- saved progress -----------------------------------------------------------------------
    def finished(self) -> dict[str, Any] | None:
        """The saved result of a finished run (checked against the current config), else None."""
        if not self.result_path.is_file():
            return None
        result = json.loads(self.result_path.read_text())
        self._check_config(result.get("config", {}), self.result_path)
        return result

    def _check_config(self, saved: Mapping, where: Path) -> None:
        # "settings" (every method setting in effect) decides; "hparams" only says which of them were given
        # explicitly, so a run given token_lr=5e-3 is the same run as one that had it by default
        want = {k: v for k, v in self.config().items() if k != "hparams"}
        saved = {k: v for k, v in saved.items() if k != "hparams"}
        if saved != want:
            keys = _diff_keys(saved, want)
            raise StateError(f"{where} was made with other settings ({', '.join(keys)} differ); use another "
                             f"--out, or delete {where.parent} to recompute that run")

    def _save_progress(self, progress: dict) -> None:
        from conceptstream.safeio import write_json_atomic

        write_json_atomic(self.progress_path, clean_json(progress))

    def _load_progress(self) -> dict[str, Any]:
        """The saved progress (checked against the current config), or a new one."""
        if self.progress_path.is_file():
            progress = json.loads(self.progress_path.read_text())
            self._check_config(progress.get("config", {}), self.progress_path)
            return progress
        progress = {"config": self.config(), "started_at": utc_now(), "tasks": [], "pending": None}
        self._save_progress(progress)
        return progress

    def _learned_tokens(self, evaluated: int) -> list[str]:
        """The tokens the state holds; they must be the sequence's first ones, at most one ahead of the evaluations."""
        from conceptstream.state import StateStore

        store = StateStore(self.state)
        learned = [c["token"] for c in store.read_manifest()["concepts"]] if store.exists() else []
        if learned != [c.token for c in self.ctx.data.concepts[: len(learned)]]:
            raise StateError(f"{self.state} holds concepts {learned} that do not match the sequence; delete "
                             f"{self.dir} to recompute this run")
        if len(learned) > evaluated + 1 or len(learned) < evaluated:
            raise StateError(f"{self.state} has {len(learned)} concepts but {evaluated} evaluated tasks were recorded; "
                             f"delete {self.dir} to recompute this run")
        return learned

    # -- the run --------------------------------------------------------------------------------
    def run(self, index: int, total: int) -> dict[str, Any]:
        """Learn and score the tasks not done yet, then the final evaluation; writes and returns ``result.json``."""
        from conceptstream.methods.registry import get_method

        self.prefix = f"[bench {index}/{total}] {self.name}"
        n_tasks = len(self.ctx.data.concepts)
        include_noun = get_method(self.variant.method).include_noun
        progress = self._load_progress()
        done = len(progress["tasks"])
        learned = self._learned_tokens(done)
        if done:
            self.ctx.log(f"{self.prefix}: resuming after task {done}/{n_tasks}")
        t_run = time.time()
        for n in range(done, n_tasks):
            if n >= len(learned):
                self._learn_task(n, progress)
            self._evaluate_task(n, progress, include_noun)
        result = self._finish(progress, include_noun)
        self.ctx.log(f"{self.prefix}: done in {time.time() - t_run:.0f}s: A_MMD {_fmt(result['summary']['A_MMD'])}, "
                     f"BwT_MMD {_fmt(result['summary']['BwT_MMD'])}, DC acc {_fmt(result['dc']['accuracy'])}")
        return result

    def _learn_task(self, n: int, progress: dict[str, Any]) -> None:
        """Learn concept ``n`` into the state (through api.learn: committed atomically); record its report as pending."""
        from conceptstream import api
        from conceptstream.safeio import write_json_atomic

        s, c = self.ctx.settings, self.ctx.data.concepts[n]
        first = self.creates_state(n)
        before = None if first else self._adapter_delta(self.state_for(n))
        t0 = time.time()
        report = api.learn(self.state_for(n), c.path, method=self.variant.method, model=s.model,
                           steps=self.variant.task_steps(s.steps),
                           seed=learn_seed(self.seed, n), adapter=self.variant.adapter if first else None,
                           rank=s.rank if first else None, targets=s.targets if first else None,
                           hparams=(self.hparams() or None) if first else None,
                           device=s.device, progress=s.progress, **self._checkpoint_action(n))
        logs_path = self.dir / "logs" / f"task{n:03d}.json"
        write_json_atomic(logs_path, clean_json(report.logs))
        progress["pending"] = {"task": n, "learn_seconds": round(time.time() - t0, 3),
                               "final_loss": report.final_loss, "steps": report.steps,
                               "logs": self.rel(logs_path), "memory_after_learn": memory_usage(),
                               "adapter_change": self._adapter_change(before, self.state_for(n))}
        self._save_progress(progress)
        self.ctx.log(f"{self.prefix}: task {n + 1}/{len(self.ctx.data.concepts)} learned {c.token} ({c.noun}) in "
                     f"{time.time() - t0:.1f}s, final loss {report.final_loss:.4f}")

    @staticmethod
    def _adapter_delta(state: Path):
        """What the state's adapter adds to the weights (:func:`~conceptstream.adapters.drift.weight_delta`),
        None for a state without an adapter file (Textual Inversion, Custom Diffusion keep theirs elsewhere)."""
        from conceptstream.adapters.drift import weight_delta
        from conceptstream.state.store import StateStore

        store = StateStore(state)
        return weight_delta(store.load_tensors("adapter")) if store.exists() and store.has_file("adapter") else None

    def _adapter_change(self, before, state: Path) -> float | None:
        """How far learning the task moved the shared adapter, relative to where it stood (None for the first
        task of a state or without an adapter)."""
        from conceptstream.adapters.drift import relative_change

        after = self._adapter_delta(state) if before is not None else None
        return None if after is None else relative_change(after, before)

    def _evaluate_task(self, n: int, progress: dict[str, Any], include_noun: bool) -> None:
        """Score the concepts seen after task ``n`` (all of them, or only the new one on a sparse row); save the entry."""
        from conceptstream import api

        s, c = self.ctx.settings, self.ctx.data.concepts[n]
        n_tasks = len(self.ctx.data.concepts)
        pending = progress.get("pending") or {}
        if pending.get("task") != n:
            pending = {"task": n, "learn_seconds": None, "final_loss": None, "logs": None,
                       "note": "learned before an interruption; its training report was not recorded"}
        t0 = time.time()
        stream = api.open_stream(self.state_for(n), model=s.model, device=s.device)
        row: dict[str, list] = {k: [] for k in METRICS}
        samples: list[str | None] = []
        scored = set(range(n + 1)) if self.full_row(n, n_tasks) else {n}
        for i in _tqdm(range(n + 1), desc=f"eval after task {n + 1}", disable=not s.progress):
            if i not in scored:  # a sparse row (--eval-every): only the new concept, for the diagonal
                for k in METRICS:
                    row[k].append(None)
                samples.append(None)
                continue
            scores, first_images = self.ctx.evaluator.score_concept(stream, i, include_noun)
            for k in METRICS:
                row[k].append(scores[k])
            sample_path = self.dir / "samples" / f"task{n:03d}_concept{i:03d}.png"
            sample_path.parent.mkdir(parents=True, exist_ok=True)
            hstack(first_images[:4]).save(sample_path)
            samples.append(self.rel(sample_path))
        del stream
        entry = {**pending, "token": c.token, "noun": c.noun, "eval_seconds": round(time.time() - t0, 3),
                 "scores": row, "samples": samples, "sample_tiles": min(4, s.images_per_prompt),
                 "memory": memory_usage(), "finished_at": utc_now()}
        progress["tasks"].append(entry)
        progress["pending"] = None
        self._save_progress(progress)
        self.ctx.log(f"{self.prefix}: task {n + 1}/{n_tasks} evaluated in {entry['eval_seconds']:.1f}s: "
                     f"MMD {mean(row['MMD']):.3f}, KID {mean(row['KID']):.3f}, I2I {mean(row['I2I']):.3f} "
                     f"(mean over {len(scored)} concept(s))")

    def _finish(self, progress: dict[str, Any], include_noun: bool) -> dict[str, Any]:
        """The final model's DC accuracy and multi-concept samples, the matrices and summaries; writes result.json."""
        from conceptstream.safeio import write_json_atomic

        t0 = time.time()
        dc, multi = self._final_evaluation(include_noun)
        final_seconds = time.time() - t0 + (dc.get("resumed") or {}).get("seconds", 0)
        tasks = progress["tasks"]
        matrices = self._matrices(tasks)
        result = clean_json({
            "format": RESULTS_FORMAT + "-run", "format_version": FORMAT_VERSION, "status": "complete",
            "label": self.variant.label, "method": self.variant.method, "bound": self.variant.bound,
            "seed": self.seed, "config": progress["config"], **self._state_record(),
            "started_at": progress.get("started_at"), "finished_at": utc_now(),
            "wall_seconds": sum((t.get("learn_seconds") or 0) + t["eval_seconds"] for t in tasks) + final_seconds,
            "final_eval_seconds": round(final_seconds, 3),
            "matrices": {k: (m.to_list() if m is not None else None) for k, m in matrices.items()},
            "summaries": {k: (self._summarize(m, METRICS[k]["higher_is_better"]) if m is not None else None)
                          for k, m in matrices.items()},
            "t2i": {"available": self.ctx.evaluator.t2i_available, "reason": self.ctx.evaluator.t2i_reason},
            "dc": dc, "summary": run_summary(matrices, dc["accuracy"], tasks, dc["calibration"]["ece"],
                                             dc_acc_own_class=(dc.get("own_class") or {}).get("accuracy"),
                                             summarize=self._summarize),
            "tasks": [dict(t) for t in tasks], "multi": multi,
            "memory": memory_usage(),
        })
        write_json_atomic(self.result_path, result)
        self.dc_checkpoint.unlink(missing_ok=True)
        return result

    def _final_evaluation(self, include_noun: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The DC classification of the held-out images and the multi-concept samples of the final model."""
        from conceptstream import api
        from conceptstream.state import StateStore

        s = self.ctx.settings
        stream = api.open_stream(self.state, model=s.model, device=s.device)
        dc = self.ctx.evaluator.dc_accuracy(stream, include_noun, checkpoint=self.dc_checkpoint,
                                            key=StateStore(self.state).generation())
        return dc, self._multi_samples(stream, include_noun)

    def _matrices(self, tasks: list[dict[str, Any]]) -> dict[str, Any]:
        """The continual matrices of every metric from the saved rows (T2I None without CLIP)."""
        n_tasks = len(self.ctx.data.concepts)
        rows = {k: [t["scores"][k] for t in tasks] for k in METRICS}
        matrices = {k: matrix_from_rows(rows[k], n_tasks) for k in ("MMD", "KID", "I2I")}
        matrices["T2I"] = matrix_from_rows(rows["T2I"], n_tasks) if self.ctx.evaluator.t2i_available else None
        return matrices

    @staticmethod
    def _summarize(matrix, higher_is_better: bool) -> dict[str, float]:
        return matrix.summary(higher_is_better)

    def _state_record(self) -> dict[str, Any]:
        """What result.json says about the trained state(s): adapter, settings, growth, path, size."""
        from conceptstream import api

        info = api.info(self.state)
        return {"adapter": info["method"].get("adapter"), "hparams": info["method"].get("hyperparameters", {}),
                "state_growth": info["method"].get("state_growth"), "state": self.rel(self.state),
                "state_bytes": info["size_bytes"]}

    def _checkpoint_action(self, n: int) -> dict[str, bool]:
        """Continue task ``n`` from the state's in-task checkpoint if it is that task's; else drop it."""
        from conceptstream.state import StateStore

        state = self.state_for(n)
        if not state.exists():
            return {}
        checkpoint = StateStore(state).load_checkpoint()
        if checkpoint is None:
            return {}
        info = checkpoint[1]
        c = self.ctx.data.concepts[n]
        steps = self.variant.task_steps(self.ctx.settings.steps)
        if (info.get("token"), info.get("steps"), info.get("seed")) == (c.token, steps, learn_seed(self.seed, n)):
            self.ctx.log(f"{self.prefix}: task {n + 1} continues from its checkpoint at step {info.get('step')}")
            return {"resume": True}
        return {"discard_checkpoint": True}

    def _multi_samples(self, stream, include_noun: bool) -> list[dict[str, Any]]:
        """Two learned tokens in one prompt, for a few pairs of concepts."""
        s, concepts = self.ctx.settings, self.ctx.data.concepts
        n = len(concepts)
        pairs = [(0, 1)] + [(n - 2, n - 1)] + [(i, i + 1) for i in range(1, n - 2)] if n >= 2 else []
        chosen: list[tuple[int, int]] = []
        for p in pairs:
            if p not in chosen and len(chosen) < s.multi_pairs:
                chosen.append(p)
        out = []
        for a, b in chosen:
            ca, cb = concepts[a], concepts[b]
            prompt = (f"a photo of a {ca.token} {ca.noun} and a {cb.token} {cb.noun}" if include_noun
                      else f"a photo of a {ca.token} and a {cb.token}")
            imgs = stream.generate(prompt, n=s.images_per_prompt, seed=s.gen_seed, steps=s.ddim_steps,
                                   guidance=s.guidance, progress=False)
            path = self.dir / "multi" / f"pair{a:03d}-{b:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            hstack(imgs).save(path)
            out.append({"concepts": [a, b], "prompt": prompt, "image": self.rel(path), "n": len(imgs)})
        return out

