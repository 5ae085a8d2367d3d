"""The cluster simulator's workloads: token ids generated directly (no tokenizer), seeded.

- `chat`: multi-turn sessions. Each session picks one of a few system prompts, then sends turns:
  every turn's prompt is the whole conversation so far (system, earlier questions and the
  replica's answers, the new question); the next turn comes a think time after the answer.
- `agent`: few long shared prefixes (llm-d's benchmark: 150 prefixes x 6k tokens), each request
  one of them plus its own question.
- `none`: no sharing at all: every prompt is new.

Sessions (chat) or requests (agent, none) arrive as a Poisson process. Each request carries its
prompt's block hashes (computed once, extended turn to turn) and how many of its tokens were
already sent by an earlier request (`shared_tokens`): what an ideal cluster would never prefill
twice, the basis of the capacity estimate that load fractions refer to.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field

from scheduler.block_manager import extend_block_hashes, prompt_block_hashes

VOCAB = 1 << 16  # token ids are 16-bit: drawn as random bytes, in C
WORKLOADS = ("chat", "agent", "none")


@dataclass(eq=False)
class SimRequest:
    request_id: int
    arrival: float
    token_ids: list[int]
    max_tokens: int
    block_hashes: list[bytes]
    shared_tokens: int = 0  # leading prompt tokens an earlier request already sent
    session_id: str | None = None
    turns_left: int = 0  # chat: turns this session still sends after this one

    @property
    def prompt_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class WorkloadShape:
    """Mean token counts of a workload, for the capacity estimate."""

    unique_prompt_tokens: float  # per request, not sent by an earlier request: what is prefilled
    prompt_tokens: float
    output_tokens: float
    kv_tokens: float  # KV a running request holds beyond prefixes shared across sessions
    shared_prefix_tokens: float = 0.0  # all prefixes shared across sessions, together


@dataclass
class Workload:
    """Open-loop arrivals plus follow-up turns (chat). Subclasses say what a request holds."""

    rate: float  # requests per second
    block_size: int = 16
    seed: int = 0
    rng: random.Random = field(init=False)
    _next_id: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError("the arrival rate must be positive")
        self.rng = random.Random(self.seed)

    def arrivals(self, num_requests: int) -> Iterator[SimRequest]:
        """Requests (chat: first turns) in arrival order, lazily."""
        raise NotImplementedError

    def follow_up(self, done: SimRequest, all_tokens: list[int], hashes: list[bytes], now: float):
        """The session's next turn after `done` finished at `now` (None: no more)."""
        return None

    def shape(self) -> WorkloadShape:
        raise NotImplementedError

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _tokens(self, n: int) -> list[int]:
        return array("H", self.rng.randbytes(2 * n)).tolist()


def output_token(request_id: int, index: int) -> int:
    """The simulated engine's `index`-th output token of a request: unique to the request, so
    only real prompt sharing produces cache hits."""
    return (request_id * 7_919 + index * 104_729) % VOCAB


@dataclass
class NoSharing(Workload):
    prompt_len: tuple[int, int] = (200, 2000)
    output_len: tuple[int, int] = (50, 300)

    def arrivals(self, num_requests: int) -> Iterator[SimRequest]:
        now = 0.0
        for _ in range(num_requests):
            now += self.rng.expovariate(self.rate)
            tokens = self._tokens(self.rng.randint(*self.prompt_len))
            yield SimRequest(
                self._id(),
                now,
                tokens,
                self.rng.randint(*self.output_len),
                prompt_block_hashes(tokens, self.block_size),
            )

    def shape(self) -> WorkloadShape:
        prompt = sum(self.prompt_len) / 2
        output = sum(self.output_len) / 2
        return WorkloadShape(prompt, prompt, output, prompt + output)


@dataclass
class Agent(Workload):
    num_prefixes: int = 150
    prefix_len: int = 6000
    question_len: tuple[int, int] = (100, 800)
    output_len: tuple[int, int] = (100, 300)
    _prefixes: list[tuple[list[int], list[bytes]]] = field(default_factory=list, init=False)

    def arrivals(self, num_requests: int) -> Iterator[SimRequest]:
        for _ in range(self.num_prefixes):
            tokens = self._tokens(self.prefix_len)
            self._prefixes.append((tokens, prompt_block_hashes(tokens, self.block_size)))
        now = 0.0
        for _ in range(num_requests):
            now += self.rng.expovariate(self.rate)
            prefix, prefix_hashes = self.rng.choice(self._prefixes)
            tokens = prefix + self._tokens(self.rng.randint(*self.question_len))
            hashes = list(prefix_hashes)
            extend_block_hashes(hashes, tokens, self.block_size)
            yield SimRequest(
                self._id(), now, tokens, self.rng.randint(*self.output_len), hashes, len(prefix)
            )

    def shape(self) -> WorkloadShape:
        question = sum(self.question_len) / 2
        output = sum(self.output_len) / 2
        return WorkloadShape(
            question,
            self.prefix_len + question,
            output,
            question + output,
            self.num_prefixes * self.prefix_len,
        )


@dataclass
class Chat(Workload):
    """`rate` counts requests (turns), so sessions start at rate / mean turns."""

    num_system_prompts: int = 10
    system_len: int = 1000
    turns: tuple[int, int] = (2, 8)
    question_len: tuple[int, int] = (50, 300)
    output_len: tuple[int, int] = (50, 300)
    think_time_s: float = 2.0  # mean (exponential) between an answer and the next question
    _systems: list[tuple[list[int], list[bytes]]] = field(default_factory=list, init=False)

    def arrivals(self, num_requests: int) -> Iterator[SimRequest]:
        """First turns only; the follow-ups come from `follow_up`. Sessions start until the
        expected number of turns reaches `num_requests` (the simulator stops there too)."""
        for _ in range(self.num_system_prompts):
            tokens = self._tokens(self.system_len)
            self._systems.append((tokens, prompt_block_hashes(tokens, self.block_size)))
        session_rate = self.rate / (sum(self.turns) / 2)
        now = 0.0
        for n in range(num_requests):
            now += self.rng.expovariate(session_rate)
            system, system_hashes = self.rng.choice(self._systems)
            tokens = system + self._tokens(self.rng.randint(*self.question_len))
            hashes = list(system_hashes)
            extend_block_hashes(hashes, tokens, self.block_size)
            yield SimRequest(
                self._id(),
                now,
                tokens,
                self.rng.randint(*self.output_len),
                hashes,
                shared_tokens=len(system),
                session_id=f"s{n}",
                turns_left=self.rng.randint(*self.turns) - 1,
            )

    def follow_up(self, done: SimRequest, all_tokens: list[int], hashes: list[bytes], now: float):
        if done.turns_left <= 0:
            return None
        shared = len(all_tokens)
        tokens = all_tokens + self._tokens(self.rng.randint(*self.question_len))
        hashes = list(hashes)
        extend_block_hashes(hashes, tokens, self.block_size)
        return SimRequest(
            self._id(),
            now + self.rng.expovariate(1 / self.think_time_s),
            tokens,
            self.rng.randint(*self.output_len),
            hashes,
            shared_tokens=shared,
            session_id=done.session_id,
            turns_left=done.turns_left - 1,
        )

    def shape(self) -> WorkloadShape:
        question = sum(self.question_len) / 2
        output = sum(self.output_len) / 2
        turns = sum(self.turns) / 2
        # Turn k's prompt: system + k questions + (k - 1) answers; mean over turns 1..T.
        prompt = self.system_len + (turns + 1) / 2 * question + (turns - 1) / 2 * output
        return WorkloadShape(
            question,
            prompt,
            output,
            prompt - self.system_len + output,
            self.num_system_prompts * self.system_len,
        )


@dataclass
class Trace(Workload):
    """Given requests (e.g. a workload also run on the real engine), replayed as they are."""

    rate: float = 1.0  # unused: the requests carry their arrival times
    requests: list[SimRequest] = field(default_factory=list)

    def arrivals(self, num_requests: int) -> Iterator[SimRequest]:
        for r in sorted(self.requests, key=lambda r: r.arrival)[:num_requests]:
            tokens = list(r.token_ids)  # the simulated sequence appends to its own copy
            hashes = prompt_block_hashes(tokens, self.block_size)
            yield SimRequest(r.request_id, r.arrival, tokens, r.max_tokens, hashes)

    def shape(self) -> WorkloadShape:
        n = max(len(self.requests), 1)
        prompt = sum(r.prompt_tokens for r in self.requests) / n
        output = sum(r.max_tokens for r in self.requests) / n
        return WorkloadShape(prompt, prompt, output, prompt + output)


def make_workload(kind: str, rate: float, block_size: int, seed: int, **options) -> Workload:
    classes = {"chat": Chat, "agent": Agent, "none": NoSharing}
    if kind not in classes:
        raise ValueError(f"unknown workload {kind!r}; choose from {WORKLOADS}")
    return classes[kind](rate=rate, block_size=block_size, seed=seed, **options)
