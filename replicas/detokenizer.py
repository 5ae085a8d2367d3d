"""Incremental detokenization with stop strings, on top of `tokenizers`' DecodeStream.

DecodeStream holds back bytes until they form whole UTF-8 characters, so a multi-byte character is
never split across deltas. Stop strings are cut from the text (unless asked to keep them), and while
a stop string could still be forming at the end of the text, that tail is not handed out.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# Prompt tokens given to the stream as context, so the first output token decodes as it would
# inside the text (leading spaces, merged bytes).
PROMPT_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        stop: list[str] | tuple[str, ...] = (),
        include_stop_str_in_output: bool = False,
    ):
        self.tokenizer = tokenizer
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        # DecodeStream seeded with ids whose text ends in an unfinished UTF-8 character hands
        # that whole text back at the first step, and later steps would turn those prompt
        # bytes into a U+FFFD of the output: seed it with whole characters only.
        whole = len(context)
        while whole and tokenizer.decode(context[:whole]).endswith("\ufffd"):
            whole -= 1
        self.stream = DecodeStream(ids=context[:whole], skip_special_tokens=skip_special_tokens)
        self.stop = list(stop)
        self.include_stop = include_stop_str_in_output
        self.hold_back = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.num_emitted = 0  # characters of `text` already returned by `take_delta`

    def update(self, token_id: int) -> str | None:
        """Add one token; return the stop string it completed, if any (the text is then final)."""
        piece = self.stream.step(self.tokenizer, token_id)
        if not piece:
            return None
        search_from = max(len(self.text) - self.hold_back, 0)
        self.text += piece
        found = [(at, stop) for stop in self.stop if (at := self.text.find(stop, search_from)) >= 0]
        if not found:
            return None
        at, stop = min(found)
        self.text = self.text[: at + len(stop) if self.include_stop else at]
        return stop

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out, minus a tail that could still become a stop string."""
        end = len(self.text) if finished or not self.stop else len(self.text) - self.hold_back
        if end <= self.num_emitted:
            return ""
        delta = self.text[self.num_emitted : end]
        self.num_emitted = end
        return delta
