"""Every CUDA kernel instance compiles with NVRTC, with no GPU and no driver.

Each stage is compiled with all of its template instances (4 scalar types x 2 index
widths) for three architectures, from exactly the source string and options the CuPy
loader uses.  Needs the ``nvrtc`` extra: ``cuda-bindings`` (the Python API),
``nvidia-cuda-nvrtc`` (libnvrtc) and ``nvidia-cuda-runtime`` (``cuda_fp16.h`` and
``cuda_bf16.h``; a CUDA toolkit found through ``CUDA_HOME`` serves as well).
"""

from __future__ import annotations

import pytest

from deformcp.backends import cuda_kernels

# sm_70 (Volta) is the oldest architecture asked for; NVRTC 13 dropped it, and then the
# oldest one that NVRTC still supports (sm_75) stands in for it.
ARCHITECTURES = ("sm_70", "sm_80", "sm_90")


@pytest.fixture(scope="module")
def nvrtc():
    try:
        from cuda.bindings import nvrtc as module
    except ImportError as exc:
        pytest.skip(f"cuda-bindings is not installed ({exc}); install the 'nvrtc' extra")
    try:
        _check(module, module.nvrtcVersion()[0], "nvrtcVersion")
    except Exception as exc:  # cuda.pathfinder raises its own error when libnvrtc is missing
        pytest.skip(f"libnvrtc could not be loaded ({type(exc).__name__}: {exc}); install nvidia-cuda-nvrtc")
    return module


@pytest.fixture(scope="module")
def cuda_include_dir():
    try:
        from cuda.pathfinder import find_nvidia_header_directory
    except ImportError as exc:
        pytest.skip(f"cuda-pathfinder is not installed ({exc}); it comes with cuda-bindings")
    directory = find_nvidia_header_directory("cudart")
    if directory is None:
        pytest.skip("cuda_fp16.h was not found (neither the nvidia-cuda-runtime wheel nor a CUDA toolkit)")
    return directory


def _check(nvrtc, result, what: str) -> None:
    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"{what} failed: {result!r}")


def _architecture(nvrtc, requested: str) -> str:
    result, supported = nvrtc.nvrtcGetSupportedArchs()
    _check(nvrtc, result, "nvrtcGetSupportedArchs")
    number = int(requested[3:])
    if number in supported:
        return requested
    older = [a for a in supported if a < number]
    assert not older, f"NVRTC supports {supported} but not {requested}"
    return f"sm_{min(supported)}"


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
        log = b" " * size
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


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("stage", sorted(cuda_kernels.STAGES))
def test_every_instance_compiles(nvrtc, cuda_include_dir, stage, arch, record_property):
    target = _architecture(nvrtc, arch)
    record_property("architecture", target)
    result, log, lowered, cubin_size = _compile(nvrtc, stage, target, cuda_include_dir)
    assert result == nvrtc.nvrtcResult.NVRTC_SUCCESS, f"{stage} for {target} failed to compile:\n{log}"
    assert "warning" not in log.lower(), f"{stage} for {target} compiled with warnings:\n{log}"
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
