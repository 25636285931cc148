"""tokenmill's compiled CPU kernels: low-bit weight x int8 activation matmuls (lowbit.cpp), the
decoder layer's small operations and a fused decode step over all layers (layers.cpp).

Built once per torch version with torch.utils.cpp_extension (g++ and ninja) into the tokenmill
cache and loaded from there afterwards; `scripts/install.sh` builds them at install time. The
kernel picks AVX512-VNNI, AVX2 or a portable loop at run time from the CPU's features.
Where they cannot be built or loaded, or TOKENMILL_KERNELS=off, `lowbit()` is None and the
quantized layers run PyTorch's own kernels; that is said in one log line.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

from tokenmill.cache import cache_root

log = logging.getLogger("tokenmill")
SOURCES = [Path(__file__).with_name(name) for name in ("lowbit.cpp", "layers.cpp")]


@functools.cache
def lowbit():
    """torch.ops.tokenmill (q4_mm, q8_mm, rms_norm, rope_, silu_mul, row_attention, step_layers,
    set_isa, isa, set_activation_terms), or None where it cannot be had."""
    if os.environ.get("TOKENMILL_KERNELS", "").lower() in ("off", "0", "no"):
        log.info("low-bit kernels off (TOKENMILL_KERNELS=off): quantized layers run PyTorch's kernels")
        return None
    try:
        _build_and_load()
    except Exception as exc:  # no compiler, no ninja, a failed build: the PyTorch path still runs
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        log.warning("low-bit kernels unavailable (%s): quantized layers run PyTorch's kernels", reason[:200])
        return None
    ops = torch.ops.tokenmill
    if os.environ.get("TOKENMILL_KERNEL_ISA"):
        ops.set_isa(os.environ["TOKENMILL_KERNEL_ISA"])
    log.info("low-bit kernels loaded: %s path", ops.isa())
    return ops


CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]


def _build_and_load() -> None:
    """Load the built library when its stamp (a hash of the sources and flags) is current; else
    build it with cpp_extension, which imports setuptools and runs ninja: 0.3 s of every start."""
    root = cache_root()
    build_dir = (root if root is not None else Path.cwd() / ".tokenmill-build") / "kernels" / f"torch-{torch.__version__}"
    stamp = build_dir / "built.txt"  # "<digest> <library file name>"
    digest = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES) + " ".join(CFLAGS).encode()).hexdigest()
    built = stamp.read_text().split() if stamp.is_file() else []
    if len(built) == 2 and built[0] == digest and (build_dir / built[1]).is_file():
        torch.ops.load_library(str(build_dir / built[1]))
        return
    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="tokenmill_kernels", sources=[str(s) for s in SOURCES], build_directory=str(build_dir),
        extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False,
    )
    # cpp_extension names a rebuild in the same folder tokenmill_kernels_v1.so, _v2, ...: the newest is this one
    library = max(build_dir.glob("tokenmill_kernels*.so"), key=lambda p: p.stat().st_mtime)
    stamp.write_text(f"{digest} {library.name}")

