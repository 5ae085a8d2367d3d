"""The model's tokenizer, loaded the same way by engines and by the API ingress."""

from __future__ import annotations

from typing import TYPE_CHECKING

from replicas.config import EngineConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class TokenizerError(ValueError):
    """The tokenizer cannot do what a request asks (e.g. no chat template)."""


def load_tokenizer(config: EngineConfig, source: str) -> PreTrainedTokenizerBase:
    """`source` is the resolved model directory or hub id (see `resolve_model_source`)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        config.tokenizer or source,
        revision=config.revision,
        trust_remote_code=config.trust_remote_code,
    )
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise TokenizerError(f"{source}: a fast (tokenizers) tokenizer is required")
    return tokenizer


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    add_generation_prompt: bool = True,
    **template_kwargs,
) -> str:
    """A conversation rendered with the model's own chat template, as text (the template adds
    its own special tokens: encode it with `add_special_tokens=False`)."""
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizerError("this model has no chat template; use completions instead")
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False, **template_kwargs
    )


def max_token_bytes(tokenizer: PreTrainedTokenizerBase) -> int:
    """An upper bound on the UTF-8 bytes of any one token's text: the longest vocabulary entry
    (byte-level BPE spells each byte as one or two bytes of its entry; SentencePiece pieces and
    byte fallbacks like <0xE3> are at least as long as what they decode to). A text of B bytes
    therefore has at least B / max_token_bytes tokens, known without tokenizing it."""
    return max(len(token.encode()) for token in tokenizer.get_vocab())
