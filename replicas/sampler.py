"""Picks the next token of every sampling sequence in a step, from one logits row each.

Work is batched over rows and skipped when no row asks for it (penalties, top-k/top-p sorting,
logprobs). Seeded rows draw from their own generator, so a seed gives the same tokens whatever
else is in the batch. Sampling uses the exponential race (argmax of p / Exp(1)), which is
equivalent to drawing from p and needs one random draw per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from replicas.messages import TokenLogprobs
from replicas.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    params: SamplingParams
    generator: torch.Generator | None
    token_ids: list[int]  # prompt + output so far
    num_prompt_tokens: int
    banned_token_ids: list[int] = field(default_factory=list)  # e.g. EOS before min_tokens


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def _column(rows: list[SamplingRow], name: str, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.tensor([getattr(r.params, name) for r in rows], dtype=dtype, device=device)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Repetition (HF: over prompt and output), presence and frequency (OpenAI: over output)."""
    vocab = logits.shape[1]
    device = logits.device
    longest = max(len(r.token_ids) for r in rows)
    # Pad with `vocab`, an extra column that is dropped after counting.
    ids = np.full((len(rows), longest), vocab, dtype=np.int64)
    is_output = np.zeros((len(rows), longest), dtype=np.float32)
    for i, row in enumerate(rows):
        ids[i, : len(row.token_ids)] = row.token_ids
        is_output[i, row.num_prompt_tokens : len(row.token_ids)] = 1
    ids_t = torch.from_numpy(ids).to(device)
    output_counts = torch.zeros(len(rows), vocab + 1, device=device)
    output_counts.scatter_add_(1, ids_t, torch.from_numpy(is_output).to(device))
    output_counts = output_counts[:, :vocab]
    seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=device)
    seen.scatter_(1, ids_t, True)
    seen = seen[:, :vocab]

    repetition = _column(rows, "repetition_penalty", logits.dtype, device)[:, None]
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits.copy_(torch.where(seen, penalized, logits))
    logits -= _column(rows, "frequency_penalty", logits.dtype, device)[:, None] * output_counts
    logits -= _column(rows, "presence_penalty", logits.dtype, device)[:, None] * (output_counts > 0)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and nucleus; `top_k` 0 means no limit."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    kth = sorted_logits.gather(1, (k - 1)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Keep a token if the mass before it is below top_p (the top token is always kept).
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


class Sampler:
    def __init__(self, generator: torch.Generator | None = None) -> None:
        # Draws for rows without a seed of their own: a seeded engine repeats its runs.
        self.generator = generator

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        logits = logits.float()
        num_rows = len(rows)
        raw_logprobs = None
        if any(r.params.logprobs is not None for r in rows):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        for i, row in enumerate(rows):
            if bias := row.params.logit_bias:
                logits[i, list(bias)] += torch.tensor(list(bias.values()), device=logits.device)
            if row.banned_token_ids:
                logits[i, row.banned_token_ids] = float("-inf")
        if any(r.params.needs_penalties for r in rows):
            apply_penalties(logits, rows)

        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if random_rows:
            tokens[random_rows] = self._sample(logits[random_rows], [rows[i] for i in random_rows])

        token_ids = tokens.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * num_rows
        if raw_logprobs is not None:
            logprobs = self._logprobs(raw_logprobs, tokens, rows)
        return SamplerOutput(token_ids, logprobs)

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        device = logits.device
        logits = logits / _column(rows, "temperature", logits.dtype, device)[:, None]
        if any(r.params.top_k > 0 or r.params.top_p < 1.0 for r in rows):
            logits = apply_top_k_top_p(
                logits,
                _column(rows, "top_k", torch.long, device),
                _column(rows, "top_p", logits.dtype, device),
            )
        probs = logits.softmax(dim=-1)
        if any(r.params.min_p > 0 for r in rows):
            min_p = _column(rows, "min_p", probs.dtype, device)[:, None]
            probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        noise = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(rows) if r.generator is None]
        if unseeded:
            noise[unseeded] = torch.empty_like(probs[unseeded]).exponential_(
                generator=self.generator
            )
        for i, row in enumerate(rows):
            if row.generator is not None:
                noise[i].exponential_(generator=row.generator)
        return (probs / noise).argmax(dim=-1)

    def _logprobs(
        self, raw_logprobs: torch.Tensor, tokens: torch.Tensor, rows: list[SamplingRow]
    ) -> list[TokenLogprobs | None]:
        top_n = max(r.params.logprobs or 0 for r in rows)
        sampled = raw_logprobs.gather(1, tokens[:, None])
        ranks = (raw_logprobs > sampled).sum(dim=-1) + 1
        top_values, top_ids = raw_logprobs.topk(top_n, dim=-1) if top_n else (None, None)
        sampled_l, ranks_l = sampled[:, 0].tolist(), ranks.tolist()
        top_values_l = top_values.tolist() if top_n else None
        top_ids_l = top_ids.tolist() if top_n else None
        out: list[TokenLogprobs | None] = []
        for i, row in enumerate(rows):
            n = row.params.logprobs
            if n is None:
                out.append(None)
                continue
            out.append(
                TokenLogprobs(
                    sampled_l[i],
                    ranks_l[i],
                    top_ids_l[i][:n] if n else [],
                    top_values_l[i][:n] if n else [],
                )
            )
        return out
