"""How long one engine step takes, from its shape: the clock of the cluster simulator and the
synthetic engine, fitted from steps measured on a real engine (`python -m cluster calibrate`).

A step's time is linear in what it does: a fixed cost (launches, the Python loop, reading the
weights once on a GPU), a cost per token fed (the matmuls), per sequence (sampling, per-row
bookkeeping), per KV token its attention reads (memory: what decodes pay) and per query-key pair
it scores (compute: what long prefill chunks pay; for a decode, pairs = KV tokens read). Fitted by
least squares with non-negative coefficients over measured steps, on relative error; pure Python,
so the scheduler package stays light.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

from scheduler.scheduler import ScheduledBatch


class StepShape(NamedTuple):
    """What one step computes."""

    num_tokens: int  # tokens fed to the model (decodes + prefill chunks)
    num_seqs: int  # sequences in the batch
    kv_tokens_read: int  # sum over sequences of the context each attends to in this step
    attention_pairs: int  # sum over sequences of tokens fed x context attended


class StepSample(NamedTuple):
    shape: StepShape
    seconds: float


def step_shape(batch: ScheduledBatch) -> StepShape:
    """The shape of a scheduled batch; call it before `Scheduler.update_computed`."""
    kv = pairs = 0
    for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
        context = seq.num_computed_tokens + n
        kv += context
        pairs += n * context
    return StepShape(batch.total_tokens, len(batch.seqs), kv, pairs)


@dataclass(frozen=True)
class StepTimeModel:
    """seconds = base + per_token * tokens + per_seq * seqs + per_kv_token * KV tokens read
    + per_attention_pair * query-key pairs."""

    base_s: float
    per_token_s: float
    per_seq_s: float = 0.0
    per_kv_token_s: float = 0.0
    per_attention_pair_s: float = 0.0
    name: str = ""
    note: str = ""  # where the numbers come from (measured where and how, or an estimate)

    def __post_init__(self) -> None:
        coefficients = self.coefficients
        if any(not math.isfinite(c) or c < 0 for c in coefficients):
            raise ValueError(f"step-time coefficients must be finite and >= 0: {coefficients}")
        if self.base_s + self.per_token_s == 0:
            raise ValueError("a step must cost something: base_s or per_token_s must be > 0")

    @property
    def coefficients(self) -> tuple[float, float, float, float, float]:
        return (
            self.base_s,
            self.per_token_s,
            self.per_seq_s,
            self.per_kv_token_s,
            self.per_attention_pair_s,
        )

    def seconds(
        self, num_tokens: int, num_seqs: int, kv_tokens_read: int, attention_pairs: int = 0
    ) -> float:
        """The time of one step of this shape (called once per simulated step: keep it cheap)."""
        return (
            self.base_s
            + self.per_token_s * num_tokens
            + self.per_seq_s * num_seqs
            + self.per_kv_token_s * kv_tokens_read
            + self.per_attention_pair_s * attention_pairs
        )

    def batch_seconds(self, batch: ScheduledBatch) -> float:
        return self.seconds(*step_shape(batch))

    @classmethod
    def for_throughput(cls, tokens_per_second: float) -> StepTimeModel:
        """A model whose steps take num_tokens / tokens_per_second: a replica that processes
        `tokens_per_second` tokens (prompt or generated) per second, whatever the batch."""
        if not tokens_per_second > 0:
            raise ValueError(f"tokens_per_second must be positive, got {tokens_per_second}")
        return cls(0.0, 1.0 / tokens_per_second, name=f"{tokens_per_second:g} tokens/s")

    # --- persistence ----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StepTimeModel:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - {"fit"}
        if unknown:
            raise ValueError(f"unknown step-time model fields: {sorted(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | Path, **extra) -> None:
        """Write the model as JSON; `extra` (e.g. fit quality) is kept under "fit"."""
        data = self.to_dict()
        if extra:
            data["fit"] = extra
        Path(path).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> StepTimeModel:
        return cls.from_dict(json.loads(Path(path).read_text()))


# --- fitting ------------------------------------------------------------------------------------


OUTLIER_RELATIVE_ERROR = 0.5  # a step this far off the fit (and 4x the median) was interrupted


def fit(samples: Iterable[StepSample], name: str = "", note: str = "") -> StepTimeModel:
    """Non-negative least squares over measured steps, on relative error: a 30 ms decode step
    weighs as much as a 500 ms prefill, so neither ITL (decodes) nor TTFT (prefills) is given up
    for the other. Errors are taken relative to the fit's own prediction (iterated: a gamma
    regression), not to the measurement, which would bias every step's time low. Steps far off
    the fit (another process took the CPU) are dropped: on a shared machine a few steps take 10x
    their time."""
    samples = [s for s in samples if s.seconds > 0]
    if len(samples) < 2 * len(StepShape._fields) + 2:
        raise ValueError(f"too few timed steps to fit a step-time model: {len(samples)}")
    kept = samples
    scale = [s.seconds for s in kept]
    for _ in range(4):
        rows = [[1.0, *s.shape] for s in kept]
        coefficients = nnls(
            [[x / c for x in row] for row, c in zip(rows, scale, strict=True)],
            [s.seconds / c for s, c in zip(kept, scale, strict=True)],
        )
        model = StepTimeModel(*coefficients, name=name, note=note)
        errors = relative_errors(model, samples)
        bound = max(OUTLIER_RELATIVE_ERROR, 4 * sorted(errors)[len(errors) // 2])
        kept = [s for s, e in zip(samples, errors, strict=True) if e <= bound]
        scale = [max(model.seconds(*s.shape), 1e-9) for s in kept]
    return model


def relative_errors(model: StepTimeModel, samples: Iterable[StepSample]) -> list[float]:
    return [abs(model.seconds(*s.shape) - s.seconds) / s.seconds for s in samples if s.seconds > 0]


def nnls(rows: Sequence[Sequence[float]], targets: Sequence[float]) -> list[float]:
    """argmin ||A x - b|| with x >= 0, for a handful of columns: the best unconstrained least
    squares fit over every subset of columns that comes out non-negative (exact, 2^k solves)."""
    k = len(rows[0])

    def residual(x: list[float]) -> float:
        return sum(
            (sum(a * c for a, c in zip(r, x, strict=True)) - t) ** 2
            for r, t in zip(rows, targets, strict=True)
        )

    best = [0.0] * k
    best_residual = residual(best)
    for size in range(1, k + 1):
        for subset in itertools.combinations(range(k), size):
            solution = _least_squares([[r[j] for j in subset] for r in rows], targets)
            if solution is None or min(solution) < 0:
                continue
            x = [0.0] * k
            for j, value in zip(subset, solution, strict=True):
                x[j] = value
            if (r := residual(x)) < best_residual:
                best, best_residual = x, r
    return best


def _least_squares(rows: list[list[float]], targets: Sequence[float]) -> list[float] | None:
    """Normal equations solved by Gaussian elimination with partial pivoting (None if singular).
    Columns are scaled to unit norm first: tokens and KV reads differ by orders of magnitude."""
    k = len(rows[0])
    norms = [math.sqrt(sum(r[j] ** 2 for r in rows)) or 1.0 for j in range(k)]
    scaled = [[r[j] / norms[j] for j in range(k)] for r in rows]
    ata = [[sum(r[i] * r[j] for r in scaled) for j in range(k)] for i in range(k)]
    atb = [sum(r[i] * t for r, t in zip(scaled, targets, strict=True)) for i in range(k)]
    m = [row + [b] for row, b in zip(ata, atb, strict=True)]
    for col in range(k):
        pivot = max(range(col, k), key=lambda i: abs(m[i][col]))
        if abs(m[pivot][col]) < 1e-12:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for i in range(k):
            if i != col:
                factor = m[i][col] / m[col][col]
                m[i] = [a - factor * b for a, b in zip(m[i], m[col], strict=True)]
    return [m[i][k] / m[i][i] / norms[i] for i in range(k)]
