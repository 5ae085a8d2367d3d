"""Prompt text to token ids at the ingress, without ever stalling its event loop.

A text that cannot fit the context is refused before tokenizing: every token spells at most
`max_token_bytes` bytes, so B bytes are at least B / max_token_bytes tokens. Long texts are
tokenized on a worker thread (the tokenizer releases the GIL), so other streams on the same
ingress keep flowing while a large prompt is encoded.
"""

import asyncio

from cluster.errors import APIError

# Texts longer than this are tokenized on a worker thread (a thread hop costs ~0.1 ms).
INLINE_TOKENIZE_CHARS = 8192


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
