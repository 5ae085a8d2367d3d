"""The step-time model: its shape of a batch, the non-negative fit, and its JSON form."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import BlockManager, Scheduler, SchedulerConfig, Sequence
from scheduler.step_time import (
    StepSample,
    StepShape,
    StepTimeModel,
    fit,
    nnls,
    relative_errors,
    step_shape,
)

TRUE = StepTimeModel(0.02, 8e-4, 4e-4, 2e-6, 7e-7)


def random_shapes(n: int, seed: int = 0) -> list[StepShape]:
    """Decode steps of 1-48 sequences and prefill-heavy steps, like an engine's."""
    rng = random.Random(seed)
    shapes = []
    for _ in range(n):
        seqs = rng.randint(1, 48)
        contexts = [rng.randint(20, 1500) for _ in range(seqs)]
        fed = [1] * seqs
        if rng.random() < 0.3:  # one prefill chunk rides along
            fed[-1] = rng.randint(16, 512)
        shapes.append(
            StepShape(
                sum(fed),
                seqs,
                sum(contexts),
                sum(f * c for f, c in zip(fed, contexts, strict=True)),
            )
        )
    return shapes


def test_fit_recovers_the_coefficients_of_noisy_steps_with_interruptions():
    rng = random.Random(1)
    samples = []
    for shape in random_shapes(600):
        seconds = TRUE.seconds(*shape) * rng.uniform(0.95, 1.05)
        if rng.random() < 0.05:  # another process took the CPU for this step
            seconds *= rng.uniform(5, 20)
        samples.append(StepSample(shape, seconds))
    model = fit(samples, name="test")
    for got, want in zip(model.coefficients, TRUE.coefficients, strict=True):
        assert got == pytest.approx(want, rel=0.15), (model, TRUE)
    clean = [s for s in samples if s.seconds < 2 * TRUE.seconds(*s.shape)]
    errors = sorted(relative_errors(model, clean))
    assert errors[len(errors) // 2] < 0.05, "median relative error on uninterrupted steps"


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.floats(0, 100, allow_nan=False), min_size=3, max_size=3),
        min_size=4,
        max_size=12,
    ),
    targets=st.data(),
)
def test_nnls_is_non_negative_and_no_worse_than_any_non_negative_guess(rows, targets):
    b = targets.draw(st.lists(st.floats(-50, 50), min_size=len(rows), max_size=len(rows)))
    rows = [[1.0, *r[1:]] for r in rows]  # an intercept keeps the problem solvable

    def residual(x):
        return sum(
            (sum(a * c for a, c in zip(r, x, strict=True)) - t) ** 2
            for r, t in zip(rows, b, strict=True)
        )

    x = nnls(rows, b)
    assert min(x) >= 0
    for guess in ([0.0, 0.0, 0.0], [max(sum(b) / len(b), 0.0), 0.0, 0.0], [1.0, 0.5, 0.25]):
        assert residual(x) <= residual(guess) * (1 + 1e-9) + 1e-9


def test_step_shape_counts_tokens_sequences_and_attended_context():
    bm = BlockManager(64, 4)
    sched = Scheduler(SchedulerConfig(16, 4, 256), bm)
    decoding = Sequence("d", list(range(10)), max_tokens=5)
    sched.add(decoding)
    batch = sched.schedule()
    sched.update_computed(batch)
    decoding.append_token(3)  # now 11 tokens, 10 computed: a decode
    sched.add(Sequence("p", list(range(100, 140)), max_tokens=5))
    batch = sched.schedule()
    assert batch.num_tokens == [1, 15]
    assert step_shape(batch) == StepShape(16, 2, 11 + 15, 1 * 11 + 15 * 15)


def test_json_round_trip_and_bad_input(tmp_path):
    path = tmp_path / "model.json"
    TRUE.save(path, median_relative_error=0.1)
    assert StepTimeModel.load(path) == TRUE
    assert StepTimeModel.from_dict(TRUE.to_dict()) == TRUE
    with pytest.raises(ValueError, match="unknown"):
        StepTimeModel.from_dict({**TRUE.to_dict(), "per_bogus_s": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        StepTimeModel(-1.0, 1e-3)
    with pytest.raises(ValueError, match="too few"):
        fit([StepSample(StepShape(1, 1, 1, 1), 0.01)] * 3)


def test_for_throughput_produces_that_many_tokens_per_second():
    model = StepTimeModel.for_throughput(250.0)
    assert model.seconds(250, 7, 10_000, 10_000) == pytest.approx(1.0)
    assert model.seconds(1, 1, 1, 1) == pytest.approx(1 / 250)
    with pytest.raises(ValueError):
        StepTimeModel.for_throughput(0)
