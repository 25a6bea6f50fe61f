"""The CUDA kernels: where their sources are, how they are assembled, and the memoized loader.

The kernels live in ``.cu`` files, one per stage, sharing ``deform_common.cuh``.  In an
installed wheel they are in ``deformcp/kernels/`` (the wheel maps the repository's
top-level ``kernels/`` there); in a source checkout or an editable install they are read
from the repository's ``kernels/``.  Everything that needs the sources (the CuPy loader,
the NVRTC compile test, the CPU emulation of the kernels) asks :func:`kernel_source`.

The header is pasted into each ``.cu`` text rather than ``#include``-d, because CuPy's
on-disk kernel cache is keyed by the source string and would not notice a changed header.

This module imports nothing from CUDA until :func:`get_kernel` is called.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Dict, List, Tuple

__all__ = [
    "COMPILE_OPTIONS",
    "HEADER",
    "INDEX_TYPES",
    "SCALAR_TYPES",
    "STAGES",
    "get_kernel",
    "kernel_dir",
    "kernel_source",
    "name_expression",
    "name_expressions",
]

HEADER = "deform_common.cuh"

# stage -> (source file, templated kernel name)
STAGES: Dict[str, Tuple[str, str]] = {
    "im2col": ("deform_im2col.cu", "deform_im2col_kernel"),
    "col2im": ("deform_col2im.cu", "deform_col2im_kernel"),
    "col2im_coord": ("deform_col2im_coord.cu", "deform_col2im_coord_kernel"),
}

# NumPy dtype name -> CUDA scalar type of the template instance.
SCALAR_TYPES: Dict[str, str] = {
    "float16": "__half",
    "bfloat16": "__nv_bfloat16",
    "float32": "float",
    "float64": "double",
}

# Index width in bits -> C type of the template instance.
INDEX_TYPES: Dict[int, str] = {32: "int", 64: "long long"}

COMPILE_OPTIONS: Tuple[str, ...] = ("--std=c++17",)

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def kernel_dir() -> Path:
    """The directory holding the ``.cu`` and ``.cuh`` files.

    Returns
    -------
    pathlib.Path
        ``deformcp/kernels`` in an installed wheel, else the repository's top-level ``kernels``.

    Raises
    ------
    FileNotFoundError
        If neither location holds the kernel sources.
    """
    candidates = (_PACKAGE_DIR / "kernels", _PACKAGE_DIR.parent / "kernels")
    for candidate in candidates:
        if (candidate / HEADER).is_file():
            return candidate
    raise FileNotFoundError(
        "deformcp's CUDA kernel sources were not found; looked for "
        + " and ".join(str(c / HEADER) for c in candidates)
        + " (a wheel carries them in deformcp/kernels, a source checkout in kernels/)"
    )


@functools.lru_cache(maxsize=None)
def kernel_source(stage: str) -> str:
    """The complete source of one stage, its ``#include "deform_common.cuh"`` replaced by the header.

    Parameters
    ----------
    stage : str
        One of :data:`STAGES` (``"im2col"``, ``"col2im"``, ``"col2im_coord"``).

    Returns
    -------
    str
        One self-contained CUDA C++ source string, as given to NVRTC.
    """
    filename, _ = _stage(stage)
    directory = kernel_dir()
    header = (directory / HEADER).read_text()
    source = (directory / filename).read_text()
    include = f'#include "{HEADER}"'
    if source.count(include) != 1:
        raise ValueError(f"{filename} must contain exactly one line {include!r}")
    return source.replace(include, f"// ---- {HEADER} (inlined) ----\n{header}\n// ---- end of {HEADER} ----")


def name_expression(stage: str, dtype_name: str, index_bits: int) -> str:
    """The C++ name of one template instance, e.g. ``deform_im2col_kernel<float, int>``.

    Parameters
    ----------
    stage : str
        One of :data:`STAGES`.
    dtype_name : str
        One of :data:`SCALAR_TYPES` (``"float16"``, ``"bfloat16"``, ``"float32"``, ``"float64"``).
    index_bits : int
        32 or 64.
    """
    _, kernel = _stage(stage)
    try:
        scalar = SCALAR_TYPES[dtype_name]
    except KeyError:
        raise ValueError(f"dtype_name must be one of {tuple(SCALAR_TYPES)}, got {dtype_name!r}") from None
    try:
        index = INDEX_TYPES[index_bits]
    except KeyError:
        raise ValueError(f"index_bits must be one of {tuple(INDEX_TYPES)}, got {index_bits!r}") from None
    return f"{kernel}<{scalar}, {index}>"


def name_expressions(stage: str) -> List[str]:
    """Every template instance of a stage: 4 scalar types x 2 index widths."""
    return [name_expression(stage, dtype, bits) for dtype in SCALAR_TYPES for bits in INDEX_TYPES]


def _stage(stage: str) -> Tuple[str, str]:
    try:
        return STAGES[stage]
    except KeyError:
        raise ValueError(f"stage must be one of {tuple(STAGES)}, got {stage!r}") from None


@functools.lru_cache(maxsize=None)
def get_kernel(device_id: int, stage: str, dtype_name: str, index_bits: int):
    """The compiled kernel of one template instance on one device, compiled at most once.

    Parameters
    ----------
    device_id : int
        CUDA device ordinal.
    stage, dtype_name, index_bits
        As for :func:`name_expression`.

    Returns
    -------
    cupy.RawKernel
        Launched on CuPy's current stream.

    Raises
    ------
    RuntimeError
        If NVRTC cannot compile the kernel for the device; the message carries the compiler's.

    Notes
    -----
    The cache is keyed by device and instance; ``get_kernel.cache_info()`` shows its hits.
    CuPy also keeps the compiled binary on disk, keyed by the source string and options.
    """
    import cupy

    expression = name_expression(stage, dtype_name, index_bits)
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=kernel_source(stage), options=COMPILE_OPTIONS,
                                name_expressions=(expression,))
        try:
            return module.get_function(expression)
        except Exception as exc:  # CuPy raises its CompileException, or a CUDA driver error
            raise RuntimeError(
                f"could not compile deformcp's CUDA kernel {expression} for device {device_id}: {exc}"
            ) from exc
