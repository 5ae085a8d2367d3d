"""Find, convert and load a model with transformers, with our paged attention plugged in.

The same path serves a hub id, a local HF directory and a GGUF file. A GGUF is dequantized once
into a safetensors directory in the model cache (~15 s), which later loads in about a second.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import logging as hf_logging

from replicas.attention import ATTENTION_NAME, register_paged_attention
from replicas.config import EngineConfig
from replicas.errors import ModelLoadError
from replicas.model_source import converted_dir, gguf_file, model_display_name
from replicas.packed_linear import can_pack, pack_linear_weights
from replicas.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    name: str


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 where the hardware computes in it, float32 otherwise."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else torch.float32


def convert_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors HF directory under `cache_dir`.

    Processes that need it at the same time (replicas and the ingress of a cold `serve run`)
    wait on a file lock while the first converts, then find the result.
    """
    target = converted_dir(gguf_path, cache_dir)
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            _convert(gguf_path, cache_dir, target)
    return target


def _convert(gguf_path: Path, cache_dir: Path, target: Path) -> None:
    logger.info("converting %s to safetensors in %s (once)", gguf_path, target)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_dir))
    try:
        kwargs = {"gguf_file": gguf_path.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, **kwargs)
        if model.hf_quantizer is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)  # atomic: a reader sees all of it or nothing
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_source(config: EngineConfig) -> str:
    """A hub id or local directory that `from_pretrained` can read."""
    gguf = gguf_file(config)
    if gguf is not None:
        return str(convert_gguf(gguf, Path(config.model_cache_dir).expanduser()))
    return config.model


def check_supported(model_config) -> None:
    """Refuse models whose attention does not run through transformers' AttentionInterface."""
    if getattr(model_config, "is_encoder_decoder", False):
        raise ModelLoadError(f"{model_config.model_type}: encoder-decoder models are not supported")
    if getattr(model_config, "is_decoder", True) is False:
        raise ModelLoadError(f"{model_config.model_type}: an encoder, not a causal language model")
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(model_config), None)
    if model_class is None:
        raise ModelLoadError(
            f"{model_config.model_type}: not a causal language model in transformers"
        )
    if not getattr(model_class, "_supports_attention_backend", False):
        raise ModelLoadError(
            f"{model_class.__name__}: its attention does not go through transformers' "
            "AttentionInterface, so the paged KV cache cannot serve it"
        )
    layer_types = set(getattr(model_config, "layer_types", None) or ())
    if unsupported := layer_types - {"full_attention", "sliding_attention"}:
        raise ModelLoadError(
            f"{model_class.__name__}: layer types {sorted(unsupported)} are not supported"
        )


def load_model(config: EngineConfig) -> LoadedModel:
    hf_logging.disable_progress_bar()
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if device.type == "cpu" and config.num_threads:
        torch.set_num_threads(config.num_threads)
    source = resolve_model_source(config)
    common = {"revision": config.revision, "trust_remote_code": config.trust_remote_code}
    try:
        model_config = AutoConfig.from_pretrained(source, **common)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {source!r}: {exc}") from exc
    check_supported(model_config)
    register_paged_attention()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=dtype,
            attn_implementation=ATTENTION_NAME,
            # Pickled weights can run code when loaded: only if the operator opts in.
            use_safetensors=None if config.allow_pickle_weights else True,
            **common,
        )
    except OSError as exc:
        hint = (
            ""
            if config.allow_pickle_weights
            else " (only safetensors weights are loaded unless allow_pickle_weights is set)"
        )
        raise ModelLoadError(f"cannot load the weights of {source!r}{hint}: {exc}") from exc
    model.to(device).eval()
    model.requires_grad_(False)
    if config.native_kernels and can_pack(device, dtype):
        pack_linear_weights(model)
    return LoadedModel(
        model, load_tokenizer(config, source), device, dtype, model_display_name(config.model)
    )
