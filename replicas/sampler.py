"""Picks the next token of every sampling sequence in a step, from one logits row each.

Work is batched over rows and skipped when no row asks for it (penalties, top-k/top-p sorting,
logprobs). Seeded rows draw from their own generator, so a seed gives the same tokens whatever
else is in the batch. Sampling uses the exponential race (argmax of p / Exp(1)), which is
equivalent to drawing from p and needs one random draw per row.

Logprobs are always of the model's raw distribution: before penalties, logit bias, banned tokens
and grammar masks (structured outputs), so they mean the same with or without constraints.
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
class GrammarMask:
    """Token bitmasks of the rows under a grammar: `bitmask[i]` applies to row `rows[i]`."""

    rows: list[int]
    bitmask: torch.Tensor  # [len(rows), ceil(vocab / 32)] int32, on the CPU


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


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def forbidden_tokens(bitmask: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    """[rows, vocab] bool, True where llguidance's bitmask (bit j of word w is token 32w + j)
    forbids the token, on `device`: numpy unpacks fastest on the CPU, bit shifts elsewhere."""
    if device.type == "cpu":
        bits = np.unpackbits(np.invert(bitmask.numpy().view(np.uint8)), axis=1, bitorder="little")
        return torch.from_numpy(bits[:, :vocab].view(np.bool_))
    return forbidden_by_shifts(bitmask.to(device, non_blocking=True), vocab)


def forbidden_by_shifts(words: torch.Tensor, vocab: int) -> torch.Tensor:
    shifts = _BIT_SHIFTS.get(words.device)
    if shifts is None:
        shifts = _BIT_SHIFTS[words.device] = torch.arange(
            32, dtype=torch.int32, device=words.device
        )
    return ((words[:, :, None] >> shifts) & 1).view(len(words), -1)[:, :vocab] == 0


def apply_token_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """Set to -inf, in place, the logits of tokens a grammar forbids; `bitmask[i]` is for row
    `rows[i]`. Other rows are not touched."""
    forbidden = forbidden_tokens(bitmask, logits.shape[1], logits.device)
    if rows == list(range(len(logits))):
        logits.masked_fill_(forbidden, float("-inf"))
        return
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(forbidden, float("-inf"))


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

    def __call__(
        self, logits: torch.Tensor, rows: list[SamplingRow], grammar: GrammarMask | None = None
    ) -> SamplerOutput:
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
        if grammar is not None and grammar.rows:
            apply_token_bitmask(logits, grammar.rows, grammar.bitmask)

        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if random_rows:
            tokens[random_rows] = self._sample(logits[random_rows], [rows[i] for i in random_rows])

        token_ids = tokens.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * num_rows
        if raw_logprobs is not None:
            logprobs = token_logprobs(raw_logprobs, tokens, [r.params.logprobs for r in rows])
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


def token_logprobs(
    logprobs: torch.Tensor, tokens: torch.Tensor, num_top: list[int | None]
) -> list[TokenLogprobs | None]:
    """Per row i: the logprob and rank of `tokens[i]` and the `num_top[i]` most likely tokens
    (None: the row asked for nothing)."""
    top_n = max((n or 0 for n in num_top), default=0)
    chosen = logprobs.gather(1, tokens[:, None])
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top_values, top_ids = logprobs.topk(top_n, dim=-1) if top_n else (None, None)
    chosen_l, ranks_l = chosen[:, 0].tolist(), ranks.tolist()
    top_values_l = top_values.tolist() if top_n else None
    top_ids_l = top_ids.tolist() if top_n else None
    out: list[TokenLogprobs | None] = []
    for i, n in enumerate(num_top):
        if n is None:
            out.append(None)
            continue
        out.append(
            TokenLogprobs(
                chosen_l[i],
                ranks_l[i],
                top_ids_l[i][:n] if n else [],
                top_values_l[i][:n] if n else [],
            )
        )
    return out


def prompt_logprobs(
    logits: torch.Tensor, next_tokens: list[int], num_top: list[int]
) -> list[TokenLogprobs]:
    """Row i: the logprob of prompt token `next_tokens[i]` given the logits at the position
    before it, with its `num_top[i]` most likely alternatives."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor(next_tokens, device=logits.device)
    return token_logprobs(logprobs, targets, num_top)
