"""CUDA 12's NVRTC through ctypes, called the way ``cuda.bindings.nvrtc`` is called.

``cuda-bindings`` 13 drives only ``libnvrtc.so.13``, and NVRTC 13 no longer compiles for
sm_70 (Volta), which CUDA 12 (CuPy's ``cupy-cuda12x``) still does.  This module loads
``libnvrtc.so.12`` from the ``nvidia-cuda-nvrtc-cu12`` wheel and offers the few functions
the NVRTC test calls, with the names, arguments and ``(result, value...)`` return tuples
of ``cuda.bindings.nvrtc``, so that one compile routine serves both.

Importing it raises :class:`importlib.metadata.PackageNotFoundError` (an ``ImportError``)
when the wheel is not installed; a wheel that is there but cannot be loaded raises
``OSError``.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.metadata
from ctypes import POINTER, byref, c_char_p, c_int, c_size_t, c_void_p
from pathlib import Path
from typing import List, Sequence, Tuple

__all__ = [
    "include_dir",
    "library_path",
    "nvrtcAddNameExpression",
    "nvrtcCompileProgram",
    "nvrtcCreateProgram",
    "nvrtcDestroyProgram",
    "nvrtcGetCUBINSize",
    "nvrtcGetLoweredName",
    "nvrtcGetProgramLog",
    "nvrtcGetProgramLogSize",
    "nvrtcResult",
    "nvrtcVersion",
]


class nvrtcResult(enum.IntEnum):
    """The ``nvrtcResult`` codes of ``nvrtc.h`` (CUDA 12.9)."""

    NVRTC_SUCCESS = 0
    NVRTC_ERROR_OUT_OF_MEMORY = 1
    NVRTC_ERROR_PROGRAM_CREATION_FAILURE = 2
    NVRTC_ERROR_INVALID_INPUT = 3
    NVRTC_ERROR_INVALID_PROGRAM = 4
    NVRTC_ERROR_INVALID_OPTION = 5
    NVRTC_ERROR_COMPILATION = 6
    NVRTC_ERROR_BUILTIN_OPERATION_FAILURE = 7
    NVRTC_ERROR_NO_NAME_EXPRESSIONS_AFTER_COMPILATION = 8
    NVRTC_ERROR_NO_LOWERED_NAMES_BEFORE_COMPILATION = 9
    NVRTC_ERROR_NAME_EXPRESSION_NOT_VALID = 10
    NVRTC_ERROR_INTERNAL_ERROR = 11
    NVRTC_ERROR_TIME_FILE_WRITE_FAILED = 12
    NVRTC_ERROR_NO_PCH_CREATE_ATTEMPTED = 13
    NVRTC_ERROR_PCH_CREATE_HEAP_EXHAUSTED = 14
    NVRTC_ERROR_PCH_CREATE = 15
    NVRTC_ERROR_CANCELLED = 16


def _wheel_file(distribution: str, folder: str, patterns: Sequence[str]) -> Path:
    """The first file under ``folder`` of an installed wheel that matches one of ``patterns``."""
    root = Path(importlib.metadata.distribution(distribution).locate_file(folder))
    for pattern in patterns:
        for path in sorted(root.glob(pattern)):
            return path
    raise FileNotFoundError(f"the {distribution} wheel is installed but has no {' or '.join(patterns)} under {root}")


def library_path() -> Path:
    """``libnvrtc.so.12`` (``nvrtc64_120_0.dll`` on Windows) from the ``nvidia-cuda-nvrtc-cu12`` wheel."""
    return _wheel_file("nvidia-cuda-nvrtc-cu12", "nvidia/cuda_nvrtc", ("lib/libnvrtc.so.12", "bin/nvrtc64_12?_0.dll"))


def include_dir() -> Path:
    """The CUDA 12 headers (``cuda_fp16.h``, ``cuda_bf16.h``) of the ``nvidia-cuda-runtime-cu12`` wheel.

    Raises
    ------
    importlib.metadata.PackageNotFoundError
        If the wheel is not installed.
    """
    return _wheel_file("nvidia-cuda-runtime-cu12", "nvidia/cuda_runtime", ("include/cuda_fp16.h",)).parent


_PROGRAM = POINTER(c_void_p)
_STRINGS = POINTER(c_char_p)
_PROTOTYPES = {
    "nvrtcVersion": (POINTER(c_int), POINTER(c_int)),
    "nvrtcCreateProgram": (_PROGRAM, c_char_p, c_char_p, c_int, _STRINGS, _STRINGS),
    "nvrtcDestroyProgram": (_PROGRAM,),
    "nvrtcAddNameExpression": (c_void_p, c_char_p),
    "nvrtcCompileProgram": (c_void_p, c_int, _STRINGS),
    "nvrtcGetProgramLogSize": (c_void_p, POINTER(c_size_t)),
    "nvrtcGetProgramLog": (c_void_p, c_void_p),
    "nvrtcGetLoweredName": (c_void_p, c_char_p, POINTER(c_char_p)),
    "nvrtcGetCUBINSize": (c_void_p, POINTER(c_size_t)),
}


def _bind_cuda_bindings_first() -> None:
    """Let ``cuda.bindings.nvrtc`` choose its libnvrtc before ``libnvrtc.so.12`` is in the process.

    cuda-pathfinder, which loads libnvrtc for cuda-bindings, takes a ``libnvrtc.so.12``
    already loaded in the process over the ``libnvrtc.so.13`` it would otherwise load, and
    then cuda-bindings 13 would silently drive CUDA 12's NVRTC.  Its choice is cached.
    """
    try:
        from cuda.pathfinder import DynamicLibNotFoundError, load_nvidia_dynamic_lib
    except ImportError:
        return
    try:
        load_nvidia_dynamic_lib("nvrtc")
    except DynamicLibNotFoundError:
        pass


_bind_cuda_bindings_first()
_library = ctypes.CDLL(str(library_path()))
for _name, _arguments in _PROTOTYPES.items():
    getattr(_library, _name).argtypes = _arguments
    getattr(_library, _name).restype = c_int


def _strings(values: Sequence[bytes]):
    return (c_char_p * len(values))(*values)


def nvrtcVersion() -> Tuple[nvrtcResult, int, int]:
    """``(result, major, minor)`` of the loaded NVRTC."""
    major, minor = c_int(), c_int()
    return nvrtcResult(_library.nvrtcVersion(byref(major), byref(minor))), major.value, minor.value


def nvrtcCreateProgram(src: bytes, name: bytes, numHeaders: int, headers: Sequence[bytes],
                       includeNames: Sequence[bytes]) -> Tuple[nvrtcResult, c_void_p]:
    """``(result, program)``; ``headers`` and ``includeNames`` are ``numHeaders`` in-memory headers."""
    program = c_void_p()
    result = _library.nvrtcCreateProgram(byref(program), src, name, numHeaders, _strings(headers),
                                         _strings(includeNames))
    return nvrtcResult(result), program


def nvrtcDestroyProgram(prog: c_void_p) -> Tuple[nvrtcResult]:
    """Free a program made by :func:`nvrtcCreateProgram`."""
    return (nvrtcResult(_library.nvrtcDestroyProgram(byref(prog))),)


def nvrtcAddNameExpression(prog: c_void_p, name_expression: bytes) -> Tuple[nvrtcResult]:
    """Ask for the mangled name of ``name_expression`` (e.g. ``b"k<float, int>"``) after compiling."""
    return (nvrtcResult(_library.nvrtcAddNameExpression(prog, name_expression)),)


def nvrtcCompileProgram(prog: c_void_p, numOptions: int, options: Sequence[bytes]) -> Tuple[nvrtcResult]:
    """Compile with ``numOptions`` command-line ``options``; a compile error is ``NVRTC_ERROR_COMPILATION``."""
    return (nvrtcResult(_library.nvrtcCompileProgram(prog, numOptions, _strings(options))),)


def nvrtcGetProgramLogSize(prog: c_void_p) -> Tuple[nvrtcResult, int]:
    """``(result, size)`` of the compile log, its terminating NUL included."""
    size = c_size_t()
    return nvrtcResult(_library.nvrtcGetProgramLogSize(prog, byref(size))), size.value


def nvrtcGetProgramLog(prog: c_void_p, log: bytearray) -> Tuple[nvrtcResult]:
    """Copy the compile log into ``log``, a ``bytearray`` of :func:`nvrtcGetProgramLogSize` bytes."""
    buffer = (ctypes.c_char * len(log)).from_buffer(log)
    return (nvrtcResult(_library.nvrtcGetProgramLog(prog, buffer)),)


def nvrtcGetLoweredName(prog: c_void_p, name_expression: bytes) -> Tuple[nvrtcResult, bytes]:
    """``(result, mangled name)`` of an expression added with :func:`nvrtcAddNameExpression`."""
    lowered = c_char_p()
    return nvrtcResult(_library.nvrtcGetLoweredName(prog, name_expression, byref(lowered))), lowered.value


def nvrtcGetCUBINSize(prog: c_void_p) -> Tuple[nvrtcResult, int]:
    """``(result, size)`` of the cubin; 0 when compiled for a virtual architecture (``compute_XX``)."""
    size = c_size_t()
    return nvrtcResult(_library.nvrtcGetCUBINSize(prog, byref(size))), size.value
