"""Compile one kernel stage for the CPU with g++ and load it with ctypes.

The source compiled is exactly the string the CuPy loader hands to NVRTC
(:func:`deformcp.backends.cuda_kernels.kernel_source`), with ``cuda_emulation.h``
standing in for CUDA and a generated table of the stage's template instances appended.
Libraries are cached on disk under a hash of everything that goes into them, so each
is compiled once, not once per test session; set ``DEFORMCP_EMULATION_CACHE`` to move
the cache.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from deformcp.backends.cuda_kernels import STAGES, name_expressions

EMULATION_DIR = Path(__file__).resolve().parent
_HELPER_FILES = ("cuda_emulation.h", "cuda_fp16.h", "cuda_bf16.h", "launcher.h")
CXX_FLAGS = ("-std=c++17", "-O1", "-shared", "-fPIC", "-Wall", "-Werror", "-Wno-unknown-pragmas")
MAX_PARAMETERS = 64
# Compile errors by library path: a broken kernel is reported once per session, not
# recompiled for every hypothesis example.
_failures: dict = {}


def compiler() -> Optional[str]:
    """Path of the C++ compiler (``$CXX``, default ``g++``), or None if there is none."""
    return shutil.which(os.environ.get("CXX", "g++"))


def template_instances(expression: str) -> List[str]:
    """Every instance of the kernel template that ``expression`` (e.g. ``k<float, int>``) instantiates."""
    template = expression.split("<", 1)[0].strip()
    for stage, (_, kernel) in STAGES.items():
        if kernel == template:
            return name_expressions(stage)
    raise ValueError(f"{expression} is an instance of no stage's kernel")


def _entry_table(expressions: Sequence[str]) -> str:
    entries = []
    for e in expressions:
        entries.append(
            f'    {{"{e}",\n'
            f"     [](const unsigned* g, const unsigned* b, void** a, unsigned long long s) {{\n"
            f"         return emulation::launch(&{e}, g, b, a, s); }},\n"
            f"     [](int* s, int* es, int c) {{ return emulation::describe(&{e}, s, es, c); }}}},"
        )
    return (
        '\n#include "launcher.h"\n\n'
        "static const emulation::Entry deformcp_entries[] = {\n" + "\n".join(entries) + "\n};\n"
        "static const int deformcp_entry_count = int(sizeof deformcp_entries / sizeof deformcp_entries[0]);\n\n"
        'extern "C" int deformcp_emulated_find(const char* name) {\n'
        "    for (int i = 0; i < deformcp_entry_count; ++i)\n"
        "        if (std::strcmp(deformcp_entries[i].name, name) == 0) return i;\n"
        "    return -1;\n}\n\n"
        'extern "C" int deformcp_emulated_describe(int entry, int* sizes, int* element_sizes, int capacity) {\n'
        "    return deformcp_entries[entry].describe(sizes, element_sizes, capacity);\n}\n\n"
        'extern "C" int deformcp_emulated_launch(int entry, const unsigned* grid, const unsigned* block,'
        " void** args, unsigned long long seed) {\n"
        "    return deformcp_entries[entry].launch(grid, block, args, seed);\n}\n"
    )


def _cache_dir() -> Path:
    configured = os.environ.get("DEFORMCP_EMULATION_CACHE")
    if configured:
        return Path(configured)
    home_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return home_cache / "deformcp" / "emulation"


@functools.lru_cache(maxsize=None)
def _compiler_identity(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout


@functools.lru_cache(maxsize=None)
def build(source: str, expressions: Tuple[str, ...]) -> Path:
    """Compile ``source`` with the given template instances exported; return the library's path.

    Raises
    ------
    RuntimeError
        If there is no compiler, or the compile fails (the message carries its output).
    """
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler: set CXX or install g++")
    text = source + "\n" + _entry_table(expressions)
    digest = hashlib.sha256()
    for part in (text, _compiler_identity(cxx), " ".join(CXX_FLAGS),
                 *((EMULATION_DIR / name).read_text() for name in _HELPER_FILES)):
        digest.update(part.encode())
        digest.update(b"\0")
    directory = _cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"{digest.hexdigest()[:32]}.so"
    if library.exists():
        return library
    if library in _failures:
        raise RuntimeError(_failures[library])
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        cpp = Path(scratch) / "kernels.cpp"
        cpp.write_text(text)
        built = Path(scratch) / "kernels.so"
        command = [cxx, *CXX_FLAGS, f"-I{EMULATION_DIR}", "-include", "cuda_emulation.h", str(cpp), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            _failures[library] = f"emulation build failed: {' '.join(command)}\n{result.stderr}"
            raise RuntimeError(_failures[library])
        os.replace(built, library)  # atomic: concurrent test workers never see half a library
    return library


class EmulatedLibrary:
    """One compiled stage: look instances up by name expression, describe and launch them."""

    def __init__(self, path: Path):
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        self._lib.deformcp_emulated_find.restype = ctypes.c_int
        self._lib.deformcp_emulated_find.argtypes = [ctypes.c_char_p]
        self._lib.deformcp_emulated_describe.restype = ctypes.c_int
        self._lib.deformcp_emulated_describe.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                                                         ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        self._lib.deformcp_emulated_launch.restype = ctypes.c_int
        self._lib.deformcp_emulated_launch.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint),
                                                       ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
                                                       ctypes.c_ulonglong]
        self._lib.deformcp_emulated_last_error.restype = ctypes.c_char_p
        self._lib.deformcp_emulated_last_error.argtypes = []

    def find(self, expression: str) -> int:
        """Index of an instance, or -1."""
        return self._lib.deformcp_emulated_find(expression.encode())

    def describe(self, entry: int) -> Tuple[List[int], List[int]]:
        """Byte size of each kernel parameter, and the element size of each pointer parameter (0 if none)."""
        sizes = (ctypes.c_int * MAX_PARAMETERS)()
        element_sizes = (ctypes.c_int * MAX_PARAMETERS)()
        count = self._lib.deformcp_emulated_describe(entry, sizes, element_sizes, MAX_PARAMETERS)
        assert count >= 0, "kernel has more parameters than MAX_PARAMETERS"
        return list(sizes[:count]), list(element_sizes[:count])

    def launch(self, entry: int, grid: Tuple[int, int, int], block: Tuple[int, int, int], args, seed: int = 0) -> None:
        """Run a kernel; ``args`` is a ``void*`` array pointing at each argument's value.

        ``seed`` shuffles the order of the blocks, and of the threads of a block between
        barriers (0: natural order).  A misused ``__syncthreads()`` raises RuntimeError.
        """
        status = self._lib.deformcp_emulated_launch(entry, (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block),
                                                    args, seed)
        if status != 0:
            raise RuntimeError(f"emulated launch failed: {self._lib.deformcp_emulated_last_error().decode()}")

    def convert(self, function: str, values, out):
        """Run one of the exported 16-bit conversions over contiguous NumPy arrays."""
        getattr(self._lib, f"deformcp_emulated_{function}")(
            ctypes.c_void_p(values.ctypes.data), ctypes.c_void_p(out.ctypes.data), ctypes.c_long(values.size))
        return out


@functools.lru_cache(maxsize=None)
def load(source: str, expressions: Tuple[str, ...]) -> EmulatedLibrary:
    """Build (or find in the cache) and load the library for ``source``."""
    return EmulatedLibrary(build(source, expressions))
