"""Native CPU kernels, compiled on first use with torch's C++ extension builder and cached on disk.

The build takes ~15 s once per machine (torch caches it under $TORCH_EXTENSIONS_DIR); without a
C++ compiler the engine falls back to the torch-level attention path, which is correct but slower.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name("paged_attention.cpp")]
# Fast-math at compile time only: linking with it would flush denormals for the whole process.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-funsafe-math-optimizations"]


@functools.cache
def load_cpu_kernels() -> bool:
    """Build (or load the cached build of) the kernels; False if this machine cannot."""
    from torch.utils.cpp_extension import load

    # -march=native code must not be reused on another CPU through a shared cache directory.
    name = f"continuum_kernels_{torch.backends.cpu.get_cpu_capability().lower()}"
    try:
        load(
            name=name,
            sources=[str(s) for s in SOURCES],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as exc:  # no compiler, no headers, ...: run without them
        logger.warning("native CPU attention kernel unavailable, using the torch path: %s", exc)
        return False
    return True
