"""A synthetic model: the real scheduler, block manager, engine loop and serving path, but each
step takes the time a step-time model gives it (sleeping, not computing) and samples tokens
without a forward pass.

With it the serving layer can be measured alone at GPU token rates on a laptop (the engine
process sleeps instead of computing), and the cluster simulator shares its step model. Set it
with `engine.synthetic` (`tokens_per_second`, or a fitted `step_time_model` JSON from
`python -m cluster calibrate`); the tokenizer is still the configured model's.
"""

from __future__ import annotations

import random
import time

import torch

from replicas.config import SyntheticConfig
from replicas.messages import TokenLogprobs
from replicas.sampler import SamplerOutput, SamplingRow
from scheduler import ScheduledBatch
from scheduler.step_time import StepTimeModel


class SyntheticRunner:
    """Stands in for `ModelRunner`: a step lasts what the step-time model says, from the moment
    the forward would start; no logits are made (the sampler below needs none)."""

    def __init__(self, model: StepTimeModel) -> None:
        self.model = model

    def execute(
        self, batch: ScheduledBatch, sample_rows: list[int], extra_positions=None
    ) -> torch.Tensor:
        done_at = time.perf_counter() + self.model.batch_seconds(batch)
        while (left := done_at - time.perf_counter()) > 0:
            time.sleep(left)
        extra = 0 if extra_positions is None else len(extra_positions)
        return torch.zeros((len(sample_rows) + extra, 1))


class SyntheticSampler:
    """Stands in for `Sampler`: random tokens from the ordinary vocabulary (never a special
    token, so requests end by max_tokens or stop tokens), or the digits 0-9 in turn."""

    def __init__(self, config: SyntheticConfig, tokenizer, seed: int) -> None:
        self.counting = config.output == "counting"
        if self.counting:
            self.digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
        special = set(tokenizer.all_special_ids)
        self.candidates = [t for t in range(len(tokenizer)) if t not in special]
        self.rng = random.Random(seed)

    def __call__(
        self, logits: torch.Tensor, rows: list[SamplingRow], grammar=None
    ) -> SamplerOutput:
        if self.counting:
            token_ids = [self.digits[(len(r.token_ids) - r.num_prompt_tokens) % 10] for r in rows]
        else:
            token_ids = [self.rng.choice(self.candidates) for _ in rows]
        logprobs = [
            None if row.params.logprobs is None else TokenLogprobs(0.0, 1, [], []) for row in rows
        ]
        return SamplerOutput(token_ids, logprobs)
