"""Continual matrices M[n][i] (score of concept i after learning task n) and their summaries.

Rows are training steps, columns concepts; only ``i <= n`` is defined (a concept cannot be scored
before it is learned), so the upper triangle holds NaN. With ``L = N - 1`` the last task:

* ``final_average``  A   = mean_i M[L][i]                      (the model at the end of the stream)
* ``plasticity``     P   = mean_i M[i][i]                      (how well each concept is learned at first)
* ``backward_transfer`` BwT = mean_{i<L} (M[i][i] - M[L][i])  for lower-is-better metrics (MMD, KID);
  this is the paper's ``BwT_MMD``. A concept that got worse has M[L][i] > M[i][i], so **BwT < 0
  means forgetting**. For higher-is-better metrics (accuracy, CLIP similarity) the sign is flipped,
  BwT = mean_{i<L} (M[L][i] - M[i][i]) (Lopez-Paz & Ranzato), so BwT < 0 means forgetting there too.
* ``forgetting``     F   = mean_{i<L} (M[L][i] - min_{i<=n<L} M[n][i])  for lower-is-better metrics
  (over the rows that were scored),
  F = mean_{i<L} (max_{i<=n<L} M[n][i] - M[L][i]) for higher-is-better (Chaudhry et al.): how much
  worse each concept ends than its best earlier score; F > 0 means forgetting.

A and P are in the metric's own units (no sign flip). With a single task BwT and F are undefined
and reported as NaN.

Over seeds, :func:`aggregate_over_seeds` gives each summary's mean, spread and 95% Student-t interval
of the mean, and :func:`paired_differences` compares two methods seed by seed: the mean difference,
its 95% t-interval, and ``separated`` only when that interval excludes 0 (the t quantile is computed
here, :func:`t_quantile`, without scipy).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

SUMMARY_KEYS = ("final_average", "backward_transfer", "forgetting", "plasticity")
CI_LEVEL = 0.95  # the two-sided level of every interval over seeds


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class ContinualMatrix:
    """Lower-triangular ``num_tasks x num_tasks`` score matrix: ``M[n][i]`` for ``i <= n``."""

    def __init__(self, num_tasks: int) -> None:
        if int(num_tasks) < 1:
            raise ValueError("a continual matrix needs at least one task")
        self.num_tasks = int(num_tasks)
        self._data = [[math.nan] * self.num_tasks for _ in range(self.num_tasks)]

    def _check(self, n: int, i: int) -> None:
        if not (0 <= n < self.num_tasks and 0 <= i < self.num_tasks):
            raise IndexError(f"entry ({n}, {i}) is outside a {self.num_tasks}-task matrix")
        if i > n:
            raise IndexError(f"entry ({n}, {i}) is above the diagonal: concept {i} is not learned after task {n}")

    def set(self, n: int, i: int, value: float) -> None:
        """Record the score of concept ``i`` after training task ``n``."""
        self._check(n, i)
        self._data[n][i] = float(value)

    def get(self, n: int, i: int) -> float:
        """``M[n][i]``; NaN when not (yet) recorded or above the diagonal."""
        if not (0 <= n < self.num_tasks and 0 <= i < self.num_tasks):
            raise IndexError(f"entry ({n}, {i}) is outside a {self.num_tasks}-task matrix")
        return self._data[n][i]

    def __getitem__(self, index: tuple[int, int]) -> float:
        return self.get(*index)

    def row(self, n: int) -> list[float]:
        """Scores of concepts ``0..n`` after task ``n``."""
        return [self.get(n, i) for i in range(n + 1)]

    def diagonal(self) -> list[float]:
        return [self._data[i][i] for i in range(self.num_tasks)]

    def missing(self, upto: int | None = None) -> list[tuple[int, int]]:
        """Lower-triangle entries not yet recorded (rows ``0..upto``)."""
        last = self.num_tasks - 1 if upto is None else upto
        return [(n, i) for n in range(last + 1) for i in range(n + 1) if math.isnan(self._data[n][i])]

    def is_complete(self) -> bool:
        return not self.missing()

    def completed_tasks(self) -> int:
        """Number of leading rows with every entry recorded."""
        for n in range(self.num_tasks):
            if any(math.isnan(v) for v in self.row(n)):
                return n
        return self.num_tasks

    def truncated(self, num_tasks: int) -> ContinualMatrix:
        """The matrix of the first ``num_tasks`` tasks (to summarise a stream still in progress)."""
        if not 1 <= num_tasks <= self.num_tasks:
            raise ValueError(f"cannot truncate a {self.num_tasks}-task matrix to {num_tasks} tasks")
        out = ContinualMatrix(num_tasks)
        for n in range(num_tasks):
            out._data[n][: n + 1] = self._data[n][: n + 1]
        return out

    def to_list(self) -> list[list[float | None]]:
        """Square JSON-friendly list of rows; NaN (unset or above the diagonal) becomes ``None``."""
        return [[_finite(v) for v in row] for row in self._data]

    @classmethod
    def from_list(cls, rows: Sequence[Sequence[float | None]]) -> ContinualMatrix:
        """Inverse of ``to_list``; also accepts ragged lower-triangular rows (row n has n+1 entries)."""
        rows = [list(r) for r in rows]
        if not rows:
            raise ValueError("a continual matrix needs at least one row")
        out = cls(len(rows))
        for n, row in enumerate(rows):
            if len(row) > out.num_tasks:
                raise ValueError(f"row {n} has {len(row)} entries; a {out.num_tasks}-task matrix has at most "
                                 f"{out.num_tasks}")
            for i, value in enumerate(row):
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    continue
                if i > n:
                    raise ValueError(f"row {n} has a value for concept {i} above the diagonal")
                out.set(n, i, value)
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ContinualMatrix) and self.to_list() == other.to_list()

    def __repr__(self) -> str:
        return f"ContinualMatrix({self.to_list()!r})"

    def summary(self, higher_is_better: bool = False) -> dict[str, float]:
        """``summarize(self, higher_is_better)``."""
        return summarize(self, higher_is_better)


def _require(matrix: ContinualMatrix, entries: Iterable[tuple[int, int]]) -> None:
    missing = [(n, i) for n, i in entries if math.isnan(matrix.get(n, i))]
    if missing:
        shown = ", ".join(f"M[{n}][{i}]" for n, i in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"the continual matrix is missing {shown}{more}; finish those evaluations or "
                         "summarise a truncated matrix")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def final_average(matrix: ContinualMatrix) -> float:
    """A = mean_i M[L][i]: every concept scored by the final model."""
    last = matrix.num_tasks - 1
    _require(matrix, [(last, i) for i in range(last + 1)])
    return _mean(matrix.row(last))


def plasticity(matrix: ContinualMatrix) -> float:
    """P = mean_i M[i][i]: each concept scored right after it was learned."""
    _require(matrix, [(i, i) for i in range(matrix.num_tasks)])
    return _mean(matrix.diagonal())


def backward_transfer(matrix: ContinualMatrix, higher_is_better: bool = False) -> float:
    """BwT over concepts ``i < L``; negative means forgetting for either metric direction (NaN for 1 task)."""
    last = matrix.num_tasks - 1
    _require(matrix, [(i, i) for i in range(last)] + [(last, i) for i in range(last)])
    sign = -1.0 if higher_is_better else 1.0
    return _mean([sign * (matrix.get(i, i) - matrix.get(last, i)) for i in range(last)])


def forgetting(matrix: ContinualMatrix, higher_is_better: bool = False) -> float:
    """F: how much worse each old concept ends than its best score before the last task (> 0 = forgot).

    Needs the diagonal and the last row; other rows count where they were scored (a bench with
    ``--eval-every K`` scores every concept only after every K-th task).
    """
    last = matrix.num_tasks - 1
    _require(matrix, [(i, i) for i in range(last)] + [(last, i) for i in range(last)])
    drops = []
    for i in range(last):
        earlier = [v for v in (matrix.get(n, i) for n in range(i, last)) if not math.isnan(v)]
        final = matrix.get(last, i)
        drops.append(max(earlier) - final if higher_is_better else final - min(earlier))
    return _mean(drops)


def summarize(matrix: ContinualMatrix, higher_is_better: bool = False) -> dict[str, float]:
    """All four summaries as a dict keyed by ``SUMMARY_KEYS`` (NaN where undefined)."""
    return {
        "final_average": final_average(matrix),
        "backward_transfer": backward_transfer(matrix, higher_is_better),
        "forgetting": forgetting(matrix, higher_is_better),
        "plasticity": plasticity(matrix),
    }


# ------------------------------------------------------------------------------ statistics over seeds


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """``I_x(a, b)``, the regularized incomplete beta function, for ``a, b > 0`` and ``0 <= x <= 1``."""
    if not (a > 0 and b > 0):
        raise ValueError(f"regularized_beta needs a, b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"regularized_beta needs 0 <= x <= 1, got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df`` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"Student's t needs df > 0, got {df}")
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


@lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``t_quantile(0.975, 4)`` = 2.776),
    by bisection on :func:`t_cdf` to about 1e-12 relative."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a quantile needs 0 < p < 1, got {p}")
    if not df > 0:
        raise ValueError(f"Student's t needs df > 0, got {df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


def ci_half_width(std: float, n: int, level: float = CI_LEVEL) -> float | None:
    """Half-width of the two-sided Student-t interval of a mean of ``n`` values with sample std ``std``
    (``t_{(1+level)/2, n-1} * std / sqrt(n)``); ``None`` below two values (no spread to estimate)."""
    if n < 2 or std is None or not math.isfinite(std):
        return None
    return t_quantile((1.0 + level) / 2.0, n - 1) * std / math.sqrt(n)


def summary_ci95(agg: Mapping[str, Any]) -> float | None:
    """The 95% t-interval half-width of a summary entry: stored, or from its std and n (older results)."""
    stored = _finite(agg.get("ci95"))
    return stored if stored is not None else ci_half_width(agg.get("std"), agg.get("n") or 0)


def _stats(values: list[float]) -> dict[str, float | int | None]:
    """Mean, std (ddof=1; 0 for one value), n and the 95% t-interval of the mean (None below 2 values)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "ci95": None, "ci_low": None, "ci_high": None}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = ci_half_width(std, n)
    return {"mean": mean, "std": std, "n": n, "ci95": half,
            "ci_low": None if half is None else mean - half, "ci_high": None if half is None else mean + half}


def aggregate_over_seeds(summaries: Sequence[Mapping[str, float | None]]) -> dict[str, dict[str, float | int | None]]:
    """Per key over seeds: ``mean``, sample standard deviation ``std`` (ddof=1; 0 for a single value),
    count ``n``, and the 95% Student-t interval of the mean: half-width ``ci95`` and bounds
    ``ci_low``/``ci_high`` (``None`` with fewer than two values).

    ``None``/NaN values (e.g. BwT of a one-task run) are skipped and not counted; a key with no
    finite value gets ``n = 0`` and ``None`` everywhere else. Keys keep first-seen order.
    """
    keys: list[str] = []
    for summary in summaries:
        for key in summary:
            if key not in keys:
                keys.append(key)
    out: dict[str, dict[str, float | int | None]] = {}
    for key in keys:
        values = []
        for summary in summaries:
            raw = summary.get(key)
            if isinstance(raw, bool) or not (raw is None or isinstance(raw, numbers.Real)):
                raise ValueError(f"summary value for {key!r} is {raw!r}; expected a number or None")
            value = _finite(raw)
            if value is not None:
                values.append(value)
        out[key] = _stats(values)
    return out


def paired_differences(method: Mapping[Any, Mapping[str, float | None]], reference: Mapping[Any, Mapping[str, float | None]],
                       higher_is_better: Mapping[str, bool]) -> dict[str, dict[str, Any]]:
    """Per summary key: ``method - reference`` on each seed both ran, then what
    :func:`aggregate_over_seeds` gives for those differences (mean, std, n, the 95% t-interval
    ``ci95``/``ci_low``/``ci_high``), ``wins`` (seeds on which the method did strictly better),
    ``separated`` (True only with two or more seeds and an interval that excludes 0) and ``better``:
    ``"method"`` or ``"reference"`` when separated (honouring ``higher_is_better``), else ``None``.

    Both arguments map seed -> that run's summary. In a bench every method of one seed shares the
    learning seeds, data and generation seeds, so pairing removes the part of the seed-to-seed
    spread that all methods share; a spread of means can hide a difference that holds on every seed.
    """
    out: dict[str, dict[str, Any]] = {}
    for key, higher in higher_is_better.items():
        diffs = []
        for seed, summary in method.items():
            a = _finite(summary.get(key))
            b = _finite((reference.get(seed) or {}).get(key))
            if a is not None and b is not None:
                diffs.append(a - b)
        agg: dict[str, Any] = _stats(diffs)
        agg["wins"] = sum(1 for d in diffs if (d > 0 if higher else d < 0))
        lo, hi = agg["ci_low"], agg["ci_high"]
        agg["separated"] = bool(agg["n"] >= 2 and lo is not None and (lo > 0 or hi < 0))
        agg["better"] = None
        if agg["separated"]:
            agg["better"] = "method" if (agg["mean"] > 0) == bool(higher) else "reference"
        out[key] = agg
    return out
