"""The reference rows of a bench table (``--methods ...,single-task,joint``; see ``variants.BOUNDS``).

Both train with ``lora``'s plain denoising loss on the bench's adapter (its rank, targets and fixed
``--set`` settings), from the same base model and with the same learn seeds as the continual runs:

- :class:`SingleTaskRun`: concept ``n`` is learned alone into a fresh state ``states/task<n>``
  (seed ``1000 * seed + n``, as task ``n`` of a continual run) and scored right after. The model that
  draws concept ``i`` is the one that learned it and nothing else, so its score stands for every later
  row: ``M[n][i] = M[i][i]`` (A = plasticity, BwT = forgetting = 0 by construction). It has no single
  model that knows every concept, so it has no DC accuracy and no multi-concept samples.
- :class:`JointRun`: all concepts learned together in one run of ``len(stream) x steps`` steps (the
  continual runs' total), then every concept scored once, and the DC classification and multi-concept
  samples of that model. Only the last row of its matrices exists: A, KID, I2I and DC accuracy are
  defined; plasticity, BwT and forgetting are not (None).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from conceptstream.errors import StateError
from conceptstream.evaluation.bench.results import METRICS
from conceptstream.evaluation.bench.run import BenchRun, _fmt, learn_seed

NO_DC = "no single model knows every concept (one state per concept)"


def _partial_summary(matrix, higher_is_better: bool) -> dict[str, float]:
    """Every summary of ``matrix`` that its scored entries define; NaN (None in JSON) for the others."""
    from conceptstream.evaluation.matrices import backward_transfer, final_average, forgetting, plasticity

    out = {}
    for key, fn, directed in (("final_average", final_average, False), ("backward_transfer", backward_transfer, True),
                              ("forgetting", forgetting, True), ("plasticity", plasticity, False)):
        try:
            out[key] = fn(matrix, higher_is_better) if directed else fn(matrix)
        except ValueError:  # entries the bound does not score
            out[key] = math.nan
    return out


def _state_tokens(state: Path) -> list[str]:
    from conceptstream.state import StateStore

    store = StateStore(state)
    return [c["token"] for c in store.read_manifest()["concepts"]] if store.exists() else []


class SingleTaskRun(BenchRun):
    """Each concept alone from the base model (see the module docstring); resumable task by task."""

    def state_for(self, n: int) -> Path:
        return self.dir / "states" / f"task{n:03d}"

    def creates_state(self, n: int) -> bool:
        return True

    def full_row(self, n: int, n_tasks: int) -> bool:
        return False  # only concept n exists in state n

    def run(self, index: int, total: int) -> dict[str, Any]:
        self.prefix = f"[bench {index}/{total}] {self.name}"
        concepts = self.ctx.data.concepts
        progress = self._load_progress()
        done = len(progress["tasks"])
        if done:
            self.ctx.log(f"{self.prefix}: resuming after concept {done}/{len(concepts)}")
        t_run = time.time()
        for n in range(done, len(concepts)):
            learned = _state_tokens(self.state_for(n))
            if learned not in ([], [concepts[n].token]):
                raise StateError(f"{self.state_for(n)} holds {learned}, not {concepts[n].token}; delete {self.dir} "
                                 "to recompute this run")
            if not learned:
                self._learn_task(n, progress)
            self._evaluate_task(n, progress, include_noun=True)
        result = self._finish(progress, include_noun=True)
        self.ctx.log(f"{self.prefix}: done in {time.time() - t_run:.0f}s: A_MMD {_fmt(result['summary']['A_MMD'])} "
                     "(single-task: each concept by its own model)")
        return result

    def _final_evaluation(self, include_noun: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return {"accuracy": None, "available": False, "reason": NO_DC, "calibration": {"ece": None}}, []

    def _matrices(self, tasks: list[dict[str, Any]]) -> dict[str, Any]:
        """Row ``n`` holds only concept ``n``'s score; it stands for every later row (``M[n][i] = M[i][i]``)."""
        n_tasks = len(self.ctx.data.concepts)
        filled = [{"scores": {k: [tasks[i]["scores"][k][i] for i in range(n + 1)] for k in METRICS}}
                  for n in range(len(tasks))]
        return super()._matrices(filled if len(filled) == n_tasks else tasks)

    def _state_record(self) -> dict[str, Any]:
        from conceptstream import api

        infos = [api.info(self.state_for(n)) for n in range(len(self.ctx.data.concepts))]
        first = infos[0]["method"]
        return {"adapter": first.get("adapter"), "hparams": first.get("hyperparameters", {}),
                "state_growth": "one state per concept", "state": self.rel(self.dir / "states"),
                "state_bytes": sum(i["size_bytes"] for i in infos)}


class JointRun(BenchRun):
    """All concepts together in one run (see the module docstring); resumable."""

    def run(self, index: int, total: int) -> dict[str, Any]:
        from conceptstream import api

        self.prefix = f"[bench {index}/{total}] {self.name}"
        s, concepts = self.ctx.settings, self.ctx.data.concepts
        progress = self._load_progress()
        t_run = time.time()
        if not progress["tasks"]:
            tokens = [c.token for c in concepts]
            learned = _state_tokens(self.state)
            if learned not in ([], tokens):
                raise StateError(f"{self.state} holds {learned}, not the stream's {tokens}; delete {self.dir} to "
                                 "recompute this run")
            if not learned:
                t0 = time.time()
                steps = self.variant.task_steps(s.steps) * len(concepts)
                report = api.learn_joint(self.state, [c.path for c in concepts], method=self.variant.method,
                                         model=s.model, steps=steps, seed=learn_seed(self.seed, 0),
                                         adapter=self.variant.adapter, rank=s.rank, targets=s.targets,
                                         hparams=self.hparams() or None, device=s.device, progress=s.progress)
                progress["pending"] = {"task": len(concepts) - 1, "learn_seconds": round(time.time() - t0, 3),
                                       "final_loss": report.final_loss, "steps": report.steps, "logs": None}
                self._save_progress(progress)
                self.ctx.log(f"{self.prefix}: learned {len(concepts)} concepts together in {steps} steps "
                             f"({time.time() - t0:.1f}s), final loss {report.final_loss:.4f}")
            self._evaluate_task(len(concepts) - 1, progress, include_noun=True)
        result = self._finish(progress, include_noun=True)
        self.ctx.log(f"{self.prefix}: done in {time.time() - t_run:.0f}s: A_MMD {_fmt(result['summary']['A_MMD'])}, "
                     f"DC acc {_fmt(result['dc']['accuracy'])} (joint: all concepts at once)")
        return result

    def _matrices(self, tasks: list[dict[str, Any]]) -> dict[str, Any]:
        """Only the last row: the joint model is scored once, after all concepts."""
        n_tasks = len(self.ctx.data.concepts)
        empty = {"scores": {k: [None] * n_tasks for k in METRICS}}
        return super()._matrices([empty] * (n_tasks - 1) + list(tasks))

    @staticmethod
    def _summarize(matrix, higher_is_better: bool) -> dict[str, float]:
        return _partial_summary(matrix, higher_is_better)


def run_class(variant) -> type[BenchRun]:
    """The run type of a bench variant: a continual run, or one of the reference bounds."""
    return {"single-task": SingleTaskRun, "joint": JointRun}.get(variant.bound, BenchRun)
