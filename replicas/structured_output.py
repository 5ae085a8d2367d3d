"""Structured outputs with llguidance: a spec compiles to a matcher per generation, and the
matchers of a step fill their next-token bitmasks in one batched call while the forward runs.

`GrammarCompiler.compile` is the one place a spec becomes a grammar: the ingress calls it to
refuse a bad spec before any replica work (it needs only the tokenizer), and the engine calls it
to get each request's matcher. A spec that is invalid, unsupported or too slow to compile raises
`GrammarError` (a ValueError) with llguidance's message.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from replicas.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

COMPILE_TIMEOUT_S = 5.0  # a grammar that takes longer to build is refused
COMPILE_CACHE_SIZE = 256  # compiled grammars kept per compiler; each request gets a copy
# llguidance's resource bounds: fuel caps the work of building the lexer and of every mask, so a
# pathological grammar fails (an error, not a hang) even on the thread that outlives a timeout.
PARSER_LIMITS = dict(initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000, verbose_errors=False)

# Grammar builds run here, so that the caller can stop waiting after COMPILE_TIMEOUT_S; llguidance
# drops the GIL while it builds. Two workers: one runaway build cannot block all others.
_compile_pool = ThreadPoolExecutor(2, thread_name_prefix="continuum-grammar-compile")


class GrammarError(ValueError):
    """A structured-output spec that cannot be used: invalid, unsupported, or too slow to build."""


def llguidance_grammar(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar text of a spec (not yet checked: `GrammarCompiler.compile` does)."""
    kind = spec.kind
    if kind in ("json", "json_object"):
        schema = spec.json_ if kind == "json" else {"type": "object"}
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from exc
        if not isinstance(schema, dict | bool):
            raise GrammarError("a JSON schema must be an object or a boolean")
        options = {"whitespace_flexible": not spec.disable_any_whitespace}
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if kind == "choice":
        if any(not c for c in spec.choice):
            raise GrammarError("choices must not be empty strings")
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in spec.choice)
        )
    try:
        return llguidance.grammar_from("grammar", spec.grammar)  # Lark, or GBNF converted to it
    except ValueError as exc:
        raise GrammarError(str(exc)) from exc


class GrammarCompiler:
    """Compiles specs for one tokenizer; identical grammars compile once (LRU) and are copied."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int | None = None,
        eos_token_ids: list[int] | None = None,
        timeout_s: float = COMPILE_TIMEOUT_S,
    ) -> None:
        """`vocab_size`: the model's logits width; `eos_token_ids`: what ends a finished grammar
        (default: the tokenizer's). The ingress, which only validates, needs neither."""
        self.ll_tokenizer = llguidance.hf.from_tokenizer(
            tokenizer,
            n_vocab=max(vocab_size or 0, len(tokenizer)),
            eos_token=eos_token_ids or None,
        )
        self.timeout_s = timeout_s
        self._limits = llguidance.LLParserLimits(**PARSER_LIMITS)
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        """A fresh matcher at the grammar's start; raises `GrammarError`."""
        grammar = llguidance_grammar(spec)
        with self._lock:
            matcher = self._cache.get(grammar)
            if matcher is not None:
                self._cache.move_to_end(grammar)
                return matcher.deep_copy()
        job = _compile_pool.submit(self._build, grammar)
        try:
            matcher = job.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise GrammarError(
                f"the grammar did not compile within {self.timeout_s:g} s; simplify it"
            ) from None
        with self._lock:
            self._cache[grammar] = matcher
            if len(self._cache) > COMPILE_CACHE_SIZE:
                self._cache.popitem(last=False)
        return matcher.deep_copy()

    def _build(self, grammar: str) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0, limits=self._limits)
        if not matcher.is_error():
            matcher.compute_bitmask()  # the first mask builds the lexer: slow grammars show here
        if matcher.is_error():
            raise GrammarError(f"invalid structured output: {matcher.get_error()}")
        return matcher


class GrammarMasks:
    """Next-token bitmasks of a step's constrained rows, filled in one llguidance call (its own
    thread pool, without the GIL) on a worker thread, so that it overlaps the forward pass."""

    def __init__(self, vocab_size: int, max_rows: int) -> None:
        self._executor = llguidance.LLExecutor()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="continuum-grammar-masks")
        # One bit per token; filled on the CPU (pinned, where CUDA can copy it asynchronously).
        self._bitmask = llguidance.torch.allocate_token_bitmask(max_rows, vocab_size)

    def start(self, matchers: list[llguidance.LLMatcher]) -> Future[torch.Tensor]:
        """Fill row i with the mask of `matchers[i]`; the result is valid until the next start."""
        bitmask = self._bitmask[: len(matchers)]
        return self._worker.submit(self._fill, matchers, bitmask)

    def _fill(self, matchers: list[llguidance.LLMatcher], bitmask: torch.Tensor) -> torch.Tensor:
        llguidance.torch.fill_next_token_bitmask_par(
            self._executor, [(m, i) for i, m in enumerate(matchers)], bitmask
        )
        return bitmask
