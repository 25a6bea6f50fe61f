"""Every CUDA kernel instance compiles with NVRTC, with no GPU and no driver.

Each stage is compiled with all of its template instances (4 scalar types x 2 index
widths, x 2 channel vector widths for the vectorized stages), from exactly the source
string and options the CuPy loader uses, by two NVRTCs:

* CUDA 12's (what ``cupy-cuda12x`` runs) for sm_70, sm_80 and sm_90: ``libnvrtc.so.12``
  from ``nvidia-cuda-nvrtc-cu12``, through ctypes (:mod:`nvrtc12`), with the headers of
  ``nvidia-cuda-runtime-cu12``;
* CUDA 13's (what ``cupy-cuda13x`` runs) for sm_75 (its oldest; it dropped sm_70), sm_80
  and sm_90: ``cuda.bindings.nvrtc`` from ``cuda-bindings``, ``libnvrtc.so.13`` from
  ``nvidia-cuda-nvrtc`` and the headers of ``nvidia-cuda-runtime`` (or of a CUDA 13
  toolkit found by ``cuda-pathfinder``).

All are in the ``nvrtc`` extra; a toolkit whose wheels are missing is skipped, saying which.
ptxas is asked for its resource report (``-Xptxas=-v``, which changes nothing else): every
instance must compile without spilling registers to local memory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import pytest

from deformcp.backends import cuda_kernels

# Architectures compiled for, by NVRTC major version; each is compiled to a cubin (SASS).
ARCHITECTURES = {12: ("sm_70", "sm_80", "sm_90"), 13: ("sm_75", "sm_80", "sm_90")}

# ptxas's report of one kernel: its entry, then its stack and spills, then its registers.
PTXAS_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\d+)'")
PTXAS_SPILLS = re.compile(r"(?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads")
PTXAS_REGISTERS = re.compile(r"Used (?P<registers>\d+) registers")
PTXAS_REPORT = "-Xptxas=-v"

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
        options += [f"--gpu-architecture={arch}".encode(), f"--include-path={include_dir}".encode(),
                    PTXAS_REPORT.encode()]
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
    count = 16 if stage in cuda_kernels.VECTORIZED_STAGES else 8
    assert len(expressions) == count and len(set(expressions)) == count
    # Each instance was emitted under its own mangled name: all of them exist in the binary.
    assert sorted(lowered) == sorted(expressions)
    assert len(set(lowered.values())) == count, lowered
    assert all(name.startswith("_Z") for name in lowered.values()), lowered
    assert cubin_size > 0
    report = _resources(log)
    assert sorted(report) == sorted(lowered.values()), f"{what}: ptxas reported {sorted(report)}"
    spilling = {name: r for name, r in report.items() if r["spill stores"] or r["spill loads"]}
    assert not spilling, f"{what}: instances spill registers: {spilling}\n{log}"
    record_property("registers", {expression: report[lowered[expression]]["registers"] for expression in expressions})


def _resources(log: str) -> dict:
    """ptxas's report per kernel: ``{mangled name: {"registers", "spill stores", "spill loads"}}``."""
    report, name = {}, None
    for line in log.splitlines():
        entry = PTXAS_ENTRY.search(line)
        if entry:
            name = entry.group("name")
            report[name] = {}
        elif name and PTXAS_SPILLS.search(line):
            spills = PTXAS_SPILLS.search(line)
            report[name].update({"spill stores": int(spills.group("stores")), "spill loads": int(spills.group("loads"))})
        elif name and PTXAS_REGISTERS.search(line):
            report[name]["registers"] = int(PTXAS_REGISTERS.search(line).group("registers"))
    for name, resources in report.items():
        assert set(resources) == {"registers", "spill stores", "spill loads"}, f"incomplete ptxas report for {name}"
    return report


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
        cuda_kernels.name_expression("sample", "int8", 32)
    with pytest.raises(ValueError, match="index_bits"):
        cuda_kernels.name_expression("sample", "float32", 16)
    with pytest.raises(ValueError, match="vector must be one of"):
        cuda_kernels.name_expression("sample", "float32", 32, 8)
    with pytest.raises(ValueError, match="no vector width"):
        cuda_kernels.name_expression("gather_keys", "float32", 32, 4)
    assert cuda_kernels.name_expression("sample", "bfloat16", 64, 8) == "deform_sample_kernel<__nv_bfloat16, long long, 8>"
