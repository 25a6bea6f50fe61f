"""The CUDA kernels: where their sources are, how they are assembled, and the memoized loader.

The kernels live in ``.cu`` files, one per stage (``deform_gather.cu`` holds two), sharing
``deform_common.cuh``.  In an installed wheel they are in ``deformcp/kernels/`` (the wheel
maps the repository's top-level ``kernels/`` there); in a source checkout or an editable
install they are read from the repository's ``kernels/``.  Everything that needs the
sources (the CuPy loader, the NVRTC compile test, the CPU emulation of the kernels) asks
:func:`kernel_source`.

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
    "VECTORIZED_STAGES",
    "get_kernel",
    "kernel_dir",
    "kernel_source",
    "name_expression",
    "name_expressions",
    "vector_widths",
]

HEADER = "deform_common.cuh"

# stage -> (source file, templated kernel name)
STAGES: Dict[str, Tuple[str, str]] = {
    "sample": ("deform_sample.cu", "deform_sample_kernel"),
    "sample_backward": ("deform_sample_backward.cu", "deform_sample_backward_kernel"),
    "gather_keys": ("deform_gather.cu", "deform_gather_keys_kernel"),
    "gather": ("deform_gather.cu", "deform_gather_kernel"),
}

# Stages whose kernels are also templated on the channel vector width VEC: the channels a
# thread loads and stores at once, 1 or a 16-byte vector (:func:`vector_widths`).
VECTORIZED_STAGES = frozenset({"sample", "sample_backward", "gather"})

# NumPy dtype name -> CUDA scalar type of the template instance.
SCALAR_TYPES: Dict[str, str] = {
    "float16": "__half",
    "bfloat16": "__nv_bfloat16",
    "float32": "float",
    "float64": "double",
}

# Index width in bits -> C type of the template instance.
INDEX_TYPES: Dict[int, str] = {32: "int", 64: "long long"}

_ITEM_SIZES: Dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
_VECTOR_BYTES = 16  # the widest global load and store, 128 bits

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
        One of :data:`STAGES` (``"sample"``, ``"sample_backward"``, ``"gather_keys"``, ``"gather"``).

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


def vector_widths(dtype_name: str) -> Tuple[int, int]:
    """The channel vector widths the vectorized stages are compiled for: 1 and one 16-byte vector.

    ``(1, 8)`` for float16 and bfloat16, ``(1, 4)`` for float32, ``(1, 2)`` for float64.
    """
    try:
        return (1, _VECTOR_BYTES // _ITEM_SIZES[dtype_name])
    except KeyError:
        raise ValueError(f"dtype_name must be one of {tuple(SCALAR_TYPES)}, got {dtype_name!r}") from None


def name_expression(stage: str, dtype_name: str, index_bits: int, vector: int = 1) -> str:
    """The C++ name of one template instance, e.g. ``deform_sample_kernel<float, int, 4>``.

    Parameters
    ----------
    stage : str
        One of :data:`STAGES`.
    dtype_name : str
        One of :data:`SCALAR_TYPES` (``"float16"``, ``"bfloat16"``, ``"float32"``, ``"float64"``).
    index_bits : int
        32 or 64.
    vector : int
        The channel vector width, one of :func:`vector_widths` for :data:`VECTORIZED_STAGES`,
        1 for the others.
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
    if stage not in VECTORIZED_STAGES:
        if vector != 1:
            raise ValueError(f"stage {stage!r} has no vector width; got vector={vector!r}")
        return f"{kernel}<{scalar}, {index}>"
    if vector not in vector_widths(dtype_name):
        raise ValueError(f"vector must be one of {vector_widths(dtype_name)} for {dtype_name}, got {vector!r}")
    return f"{kernel}<{scalar}, {index}, {vector}>"


def name_expressions(stage: str) -> List[str]:
    """Every template instance of a stage: 4 scalar types x 2 index widths (x 2 vector widths if vectorized)."""
    return [name_expression(stage, dtype, bits, vector) for dtype in SCALAR_TYPES for bits in INDEX_TYPES
            for vector in (vector_widths(dtype) if stage in VECTORIZED_STAGES else (1,))]


def _stage(stage: str) -> Tuple[str, str]:
    try:
        return STAGES[stage]
    except KeyError:
        raise ValueError(f"stage must be one of {tuple(STAGES)}, got {stage!r}") from None


@functools.lru_cache(maxsize=None)
def get_kernel(device_id: int, stage: str, dtype_name: str, index_bits: int, vector: int = 1):
    """The compiled kernel of one template instance on one device, compiled at most once.

    Parameters
    ----------
    device_id : int
        CUDA device ordinal.
    stage, dtype_name, index_bits, vector
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

    expression = name_expression(stage, dtype_name, index_bits, vector)
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=kernel_source(stage), options=COMPILE_OPTIONS,
                                name_expressions=(expression,))
        try:
            return module.get_function(expression)
        except Exception as exc:  # CuPy raises its CompileException, or a CUDA driver error
            raise RuntimeError(
                f"could not compile deformcp's CUDA kernel {expression} for device {device_id}: {exc}"
            ) from exc
