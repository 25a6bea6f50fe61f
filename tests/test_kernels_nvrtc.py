"""Every CUDA kernel instance compiles with NVRTC, with no GPU and no driver.

Each stage is compiled with all of its template instances (4 scalar types x 2 index
widths), from exactly the source string and options the CuPy loader uses, by two NVRTCs:

* CUDA 12's (what ``cupy-cuda12x`` runs) for sm_70, sm_80 and sm_90: ``libnvrtc.so.12``
  from ``nvidia-cuda-nvrtc-cu12``, through ctypes (:mod:`nvrtc12`), with the headers of
  ``nvidia-cuda-runtime-cu12``;
* CUDA 13's (what ``cupy-cuda13x`` runs) for sm_75 (its oldest; it dropped sm_70), sm_80
  and sm_90: ``cuda.bindings.nvrtc`` from ``cuda-bindings``, ``libnvrtc.so.13`` from
  ``nvidia-cuda-nvrtc`` and the headers of ``nvidia-cuda-runtime`` (or of a CUDA 13
  toolkit found by ``cuda-pathfinder``).

All are in the ``nvrtc`` extra; a toolkit whose wheels are missing is skipped, saying which.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import pytest

from deformcp.backends import cuda_kernels

# Architectures compiled for, by NVRTC major version; each is compiled to a cubin (SASS).
ARCHITECTURES = {12: ("sm_70", "sm_80", "sm_90"), 13: ("sm_75", "sm_80", "sm_90")}

# NVRTC 12.9 says this for every architecture before sm_75, and has no option to silence
# it short of -w (which would hide every warning); it is the one warning let through.
DEPRECATED_ARCHITECTURE = re.compile(
    r"^nvrtc: warning: Architectures prior to '<compute/sm>_75' are deprecated and may be removed in a future"
    r" release$\n?", re.MULTILINE)


class Toolchain(NamedTuple):
    nvrtc: object  # cuda.bindings.nvrtc, or the nvrtc12 module with the same calls
    include_dir: Path  # cuda_fp16.h and cuda_bf16.h
    version: str


def _headers_major(include_dir: Path) -> int:
    text = (Path(include_dir) / "cuda_runtime_api.h").read_text()
    return int(re.search(r"#define\s+CUDART_VERSION\s+(\d+)", text).group(1)) // 1000


def _nvrtc13() -> Toolchain:
    try:
        from cuda.bindings import nvrtc
        from cuda.pathfinder import DynamicLibNotFoundError, find_nvidia_header_directory, load_nvidia_dynamic_lib
    except ImportError as exc:
        pytest.skip(f"cuda-bindings is not installed ({exc}); install the 'nvrtc' extra")
    try:
        result, major, minor = nvrtc.nvrtcVersion()
    except DynamicLibNotFoundError as exc:
        pytest.skip(f"libnvrtc.so.13 was not found ({exc}); install nvidia-cuda-nvrtc")
    _check(nvrtc, result, "nvrtcVersion")
    if major != 13:
        # cuda-pathfinder takes a libnvrtc.so.12 that something loaded before it (nvrtc12
        # prevents that), else falls back to the CUDA 12 wheel's when the CUDA 13 one is missing.
        loaded = load_nvidia_dynamic_lib("nvrtc")
        if loaded.was_already_loaded_from_elsewhere:
            pytest.fail(f"cuda-bindings is driving NVRTC {major}.{minor} ({loaded.abs_path}), loaded before it")
        pytest.skip(f"cuda-bindings found only NVRTC {major}.{minor} ({loaded.abs_path}); install nvidia-cuda-nvrtc")
    include_dir = find_nvidia_header_directory("cudart")
    # Without nvidia-cuda-runtime, cuda-pathfinder falls back to the CUDA 12 wheel's headers.
    if include_dir is None or _headers_major(include_dir) != 13:
        pytest.skip(f"the CUDA 13 cuda_fp16.h was not found (only {include_dir}); install nvidia-cuda-runtime")
    return Toolchain(nvrtc, Path(include_dir), f"{major}.{minor}")


def _nvrtc12() -> Toolchain:
    from importlib.metadata import PackageNotFoundError

    try:
        import nvrtc12
        include_dir = nvrtc12.include_dir()
    except PackageNotFoundError as exc:
        pytest.skip(f"the CUDA 12 wheel {exc.name} is not installed; install the 'nvrtc' extra")
    result, major, minor = nvrtc12.nvrtcVersion()
    _check(nvrtc12, result, "nvrtcVersion")
    return Toolchain(nvrtc12, include_dir, f"{major}.{minor}")


@pytest.fixture(scope="module")
def toolchain(request) -> Toolchain:
    """The NVRTC of CUDA ``request.param`` (12 or 13) and its headers; skipped if its wheels are missing."""
    found = {12: _nvrtc12, 13: _nvrtc13}[request.param]()
    assert found.version.split(".")[0] == str(request.param), f"asked for NVRTC {request.param}, loaded {found.version}"
    assert _headers_major(found.include_dir) == request.param, found.include_dir
    return found


def _check(nvrtc, result, what: str) -> None:
    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"{what} failed: {result!r}")


def _compile(nvrtc, stage: str, arch: str, include_dir: str):
    """Compile every instance of ``stage``; return (result, log, lowered names, cubin size)."""
    expressions = cuda_kernels.name_expressions(stage)
    result, program = nvrtc.nvrtcCreateProgram(cuda_kernels.kernel_source(stage).encode(), f"{stage}.cu".encode(),
                                               0, [], [])
    _check(nvrtc, result, "nvrtcCreateProgram")
    try:
        for expression in expressions:
            _check(nvrtc, nvrtc.nvrtcAddNameExpression(program, expression.encode())[0], "nvrtcAddNameExpression")
        options = [o.encode() for o in cuda_kernels.COMPILE_OPTIONS]
        options += [f"--gpu-architecture={arch}".encode(), f"--include-path={include_dir}".encode()]
        (compiled,) = nvrtc.nvrtcCompileProgram(program, len(options), options)
        result, size = nvrtc.nvrtcGetProgramLogSize(program)
        _check(nvrtc, result, "nvrtcGetProgramLogSize")
        log = bytearray(size)
        _check(nvrtc, nvrtc.nvrtcGetProgramLog(program, log)[0], "nvrtcGetProgramLog")
        log = log.decode(errors="replace").rstrip("\x00 \n")
        if compiled != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            return compiled, log, {}, 0
        lowered = {}
        for expression in expressions:
            result, name = nvrtc.nvrtcGetLoweredName(program, expression.encode())
            _check(nvrtc, result, f"nvrtcGetLoweredName({expression})")
            lowered[expression] = name.decode() if isinstance(name, bytes) else name
        result, cubin_size = nvrtc.nvrtcGetCUBINSize(program)
        _check(nvrtc, result, "nvrtcGetCUBINSize")
        return compiled, log, lowered, cubin_size
    finally:
        nvrtc.nvrtcDestroyProgram(program)


@pytest.mark.parametrize("stage", sorted(cuda_kernels.STAGES))
@pytest.mark.parametrize(
    "toolchain, arch",
    [pytest.param(major, arch, id=f"nvrtc{major}-{arch}") for major, archs in ARCHITECTURES.items() for arch in archs],
    indirect=["toolchain"],
)
def test_every_instance_compiles(toolchain, stage, arch, record_property):
    record_property("nvrtc", toolchain.version)
    record_property("include_dir", str(toolchain.include_dir))
    nvrtc = toolchain.nvrtc
    result, log, lowered, cubin_size = _compile(nvrtc, stage, arch, toolchain.include_dir)
    what = f"NVRTC {toolchain.version}: {stage} for {arch}"
    assert result == nvrtc.nvrtcResult.NVRTC_SUCCESS, f"{what} failed to compile ({result!r}):\n{log}"
    if int(arch.split("_")[1]) < 75:
        notice = DEPRECATED_ARCHITECTURE.search(log)
        record_property("deprecation", notice and notice.group().strip())
        log = DEPRECATED_ARCHITECTURE.sub("", log)
    assert "warning" not in log.lower(), f"{what} compiled with warnings:\n{log}"
    expressions = cuda_kernels.name_expressions(stage)
    assert len(expressions) == 8 and len(set(expressions)) == 8
    # Each instance was emitted under its own mangled name: all 8 exist in the binary.
    assert sorted(lowered) == sorted(expressions)
    assert len(set(lowered.values())) == 8, lowered
    assert all(name.startswith("_Z") for name in lowered.values()), lowered
    assert cubin_size > 0


def test_kernel_source_is_self_contained():
    for stage in cuda_kernels.STAGES:
        source = cuda_kernels.kernel_source(stage)
        assert f'#include "{cuda_kernels.HEADER}"' not in source
        assert "namespace dcn" in source, "the shared header was not inlined"
        assert cuda_kernels.STAGES[stage][1] in source


def test_loader_rejects_unknown_names():
    with pytest.raises(ValueError, match="stage"):
        cuda_kernels.kernel_source("im2row")
    with pytest.raises(ValueError, match="dtype_name"):
        cuda_kernels.name_expression("im2col", "int8", 32)
    with pytest.raises(ValueError, match="index_bits"):
        cuda_kernels.name_expression("im2col", "float32", 16)
