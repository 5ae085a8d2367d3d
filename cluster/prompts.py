"""Prompt text to token ids at the ingress, without ever stalling its event loop.

A text that cannot fit the context is refused before tokenizing: every token spells at most
`max_token_bytes` bytes, so B bytes are at least B / max_token_bytes tokens. Long texts are
tokenized on a worker thread (the tokenizer releases the GIL), so other streams on the same
ingress keep flowing while a large prompt is encoded.

A scored prompt (completions' `echo` with `logprobs`) is spelled back token by token: its text and
where each token begins in it (OpenAI's `text_offset`).
"""

import asyncio

from cluster.errors import APIError

# Texts longer than this are tokenized on a worker thread (a thread hop costs ~0.1 ms).
INLINE_TOKENIZE_CHARS = 8192
# Prompts longer than this are spelled on a worker thread (~1 us a token).
INLINE_SPELL_TOKENS = 2048


def prompt_too_long(param: str, size: str, limit: int) -> APIError:
    where = "messages" if param == "messages" else "prompt"
    return APIError(
        400,
        f"the {where} has {size}; this server accepts at most {limit} prompt tokens: "
        f"shorten the {where}",
        param=param,
        code="context_length_exceeded",
    )


class PromptTokenizer:
    def __init__(self, tokenizer) -> None:
        from replicas.tokenizer import max_token_bytes

        self.tokenizer = tokenizer
        self.max_token_bytes = max_token_bytes(tokenizer)

    async def encode(
        self, text: str, limit: int, param: str, add_special_tokens: bool = True
    ) -> list[int]:
        """Token ids of `text`; a 400 if it has more than `limit` tokens for sure."""
        size = len(text.encode(errors="surrogatepass"))
        if (at_least := -(-size // self.max_token_bytes)) > limit:
            raise prompt_too_long(param, f"at least {at_least} tokens ({size} bytes)", limit)
        if len(text) <= INLINE_TOKENIZE_CHARS:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return await asyncio.to_thread(
            self.tokenizer.encode, text, add_special_tokens=add_special_tokens
        )

    async def spell(self, token_ids: list[int]) -> tuple[str, list[int]]:
        """The text `token_ids` decode to (special tokens included), and the character at which
        each token's text begins in it; a token inside a multi-byte character begins where the
        character does."""
        if len(token_ids) <= INLINE_SPELL_TOKENS:
            return self._spell(token_ids)
        return await asyncio.to_thread(self._spell, token_ids)

    def _spell(self, token_ids: list[int]) -> tuple[str, list[int]]:
        from tokenizers.decoders import DecodeStream

        backend = self.tokenizer.backend_tokenizer
        stream = DecodeStream(skip_special_tokens=False)
        pieces: list[str] = []
        offsets: list[int] = []
        length = 0
        for token_id in token_ids:
            offsets.append(length)
            if piece := stream.step(backend, token_id):
                pieces.append(piece)
                length += len(piece)
        return "".join(pieces), offsets
