"""Seeded synthetic workloads shared by the offline and HTTP benchmarks.

A request is a chat conversation of random words sized to a token length (the chat template's own
tokens included), with a number of output tokens to generate with EOS ignored. The same seed gives
the same requests, so the engine, our server and another server see identical work.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SYSTEM_PROMPT = "You are a helpful assistant."
WORKLOADS = ("random", "shared-prefix", "long-short", "documents")
QUESTIONS = 4  # per document, in the `documents` workload


@dataclass
class BenchRequest:
    messages: list[dict[str, str]]
    prompt_token_ids: list[int]
    max_tokens: int
    # Leading prompt tokens an earlier request of the workload already sent (what a prefix
    # cache can serve), for the `documents` workload's repeats.
    repeated_prefix_tokens: int = 0


class PromptBuilder:
    def __init__(self, tokenizer, seed: int):
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)
        self.words = sorted(
            t[1:]
            for t in tokenizer.get_vocab()
            if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 3
        )
        self.overhead = len(self.render(SYSTEM_PROMPT, ""))

    def render(self, system: str, user: str) -> list[int]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)

    def text(self, num_words: int) -> str:
        return " ".join(self.rng.choices(self.words, k=max(num_words, 1)))

    def request(
        self, prompt_len: int, max_tokens: int, system: str = SYSTEM_PROMPT
    ) -> BenchRequest:
        """A conversation whose rendered prompt has about `prompt_len` tokens."""
        fixed = len(self.render(system, ""))
        user = self.text(prompt_len - fixed)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        return BenchRequest(messages, self.render(system, user), max_tokens)


def make_workload(
    tokenizer,
    kind: str,
    num_requests: int,
    prompt_len: tuple[int, int],
    output_len: tuple[int, int],
    seed: int,
) -> list[BenchRequest]:
    """`random`: uniform lengths; `shared-prefix`: one long system prompt shared by every request
    (prefix caching); `long-short`: alternating long and short prompts (routing); `documents`:
    documents of `prompt_len[1]` words, each asked `QUESTIONS` questions of up to
    `prompt_len[0]` tokens, in rounds (every document's first question, then every second one):
    a repeat can be served from the cache of the replica that holds its document."""
    builder = PromptBuilder(tokenizer, seed)
    rng = builder.rng
    if kind == "random":
        return [
            builder.request(rng.randint(*prompt_len), rng.randint(*output_len))
            for _ in range(num_requests)
        ]
    if kind == "shared-prefix":
        system = builder.text(max(prompt_len[1] - prompt_len[0], 8))
        return [
            builder.request(
                len(builder.render(system, "")) + rng.randint(1, prompt_len[0]),
                rng.randint(*output_len),
                system=system,
            )
            for _ in range(num_requests)
        ]
    if kind == "long-short":
        low, high = prompt_len
        return [
            builder.request(
                rng.randint(high * 3 // 4, high)
                if i % 2
                else rng.randint(low, low + (high - low) // 8),
                rng.randint(*output_len),
            )
            for i in range(num_requests)
        ]
    if kind == "documents":
        documents = [builder.text(prompt_len[1]) for _ in range(-(-num_requests // QUESTIONS))]
        empty = [len(builder.render(document, "")) for document in documents]
        work: list[BenchRequest] = []
        first: dict[int, list[int]] = {}
        for question in range(QUESTIONS):
            for d, document in enumerate(documents):
                if len(work) == num_requests:
                    return work
                length = empty[d] + rng.randint(1, max(prompt_len[0], 1))
                request = builder.request(length, rng.randint(*output_len), system=document)
                if question:
                    request.repeated_prefix_tokens = _common_prefix(first[d], request)
                else:
                    first[d] = request.prompt_token_ids
                work.append(request)
        return work
    raise ValueError(f"unknown workload {kind!r}; choose from {WORKLOADS}")


def _common_prefix(ids: list[int], request: BenchRequest) -> int:
    for i, (a, b) in enumerate(zip(ids, request.prompt_token_ids, strict=False)):
        if a != b:
            return i
    return min(len(ids), len(request.prompt_token_ids))


def random_token_workload(
    vocab_size: int,
    num_requests: int,
    prompt_len: tuple[int, int],
    output_len: tuple[int, int],
    seed: int,
) -> list[BenchRequest]:
    """Prompts of uniformly random token ids, for models without a real tokenizer (a
    random-weight model built on the spot): lengths drawn like the `random` workload."""
    rng = random.Random(seed)
    work = []
    for _ in range(num_requests):
        prompt = [rng.randrange(vocab_size) for _ in range(rng.randint(*prompt_len))]
        work.append(BenchRequest([], prompt, rng.randint(*output_len)))
    return work
