"""The extras install what their paths load: ``pip install "deformcp[cuda13]"`` must give a working GPU path.

Read from ``pyproject.toml`` (what every build's metadata is made from).  CuPy's wheels
carry no CUDA library: ``cupy.matmul`` needs cuBLAS, the kernels need NVRTC and the CUDA
headers they include (``cuda_fp16.h``, ``cuda_bf16.h``).  Either CuPy's ``ctk`` extra
provides them (CuPy 14's is ``cuda-toolkit[cudart,nvrtc,cublas,...]==<CUDA major>.*``),
or NVIDIA's wheels are named one by one.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ImportError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
CUDA_EXTRAS = {"cuda12": 12, "cuda13": 13}

# What the GPU path loads, and NVIDIA's wheel of it for each CUDA major version.
NVIDIA_WHEELS = {
    "cuBLAS": {12: "nvidia-cublas-cu12", 13: "nvidia-cublas"},
    "NVRTC": {12: "nvidia-cuda-nvrtc-cu12", 13: "nvidia-cuda-nvrtc"},
    "the CUDA headers": {12: "nvidia-cuda-runtime-cu12", 13: "nvidia-cuda-runtime"},
}
# The cuda-toolkit extra of each, as CuPy's ctk extra names them.
TOOLKIT_PARTS = {"cuBLAS": "cublas", "NVRTC": "nvrtc", "the CUDA headers": "cudart"}


def _extra(name: str) -> dict:
    """The requirements of one extra of deformcp, by (normalised) project name."""
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    requirements = [Requirement(text) for text in extras[name]]
    return {r.name.lower().replace("_", "-"): r for r in requirements}


def _cupy(extra: str) -> Requirement:
    major = CUDA_EXTRAS[extra]
    requirements = _extra(extra)
    assert f"cupy-cuda{major}x" in requirements, f"{extra} does not install CuPy for CUDA {major}"
    return requirements[f"cupy-cuda{major}x"]


@pytest.mark.parametrize("library", list(NVIDIA_WHEELS))
@pytest.mark.parametrize("extra", list(CUDA_EXTRAS))
def test_cuda_extras_install_what_the_gpu_path_loads(extra, library):
    wheel = NVIDIA_WHEELS[library][CUDA_EXTRAS[extra]]
    provided = "ctk" in _cupy(extra).extras or wheel in _extra(extra)
    assert provided, f"{extra} installs no {library}: add CuPy's ctk extra or {wheel}"


@pytest.mark.parametrize("extra", list(CUDA_EXTRAS))
def test_cuda_extras_admit_only_what_has_bfloat16(extra):
    # CuPy 14 is the first with bfloat16, which it enables with NumPy >= 2.1.2 and ml_dtypes importable.
    cupy = _cupy(extra).specifier
    assert not cupy.contains("13.6.0") and cupy.contains("14.0.0") and cupy.contains("14.2.0")
    requirements = _extra(extra)
    assert "numpy" in requirements and "ml-dtypes" in requirements
    numpy = requirements["numpy"].specifier
    assert not numpy.contains("2.1.1") and numpy.contains("2.1.2")


def test_jax_extra_has_what_the_adapter_calls():
    # jax.experimental.buffer_callback, the in-place CUDA path, first shipped in jax 0.6.1.
    jax = _extra("jax")["jax"].specifier
    assert not jax.contains("0.6.0") and jax.contains("0.6.1")


def _installed_cupys() -> list:
    names = [f"cupy-cuda{major}x" for major in CUDA_EXTRAS.values()]
    found = []
    for name in names:
        try:
            found.append((name, importlib.metadata.requires(name) or []))
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def test_cupys_ctk_extra_holds_cublas_nvrtc_and_the_headers():
    """Where a CuPy is installed, its own metadata confirms what the ctk extra stands for above."""
    installed = _installed_cupys()
    if not installed:
        pytest.skip("no cupy-cuda12x or cupy-cuda13x is installed here")
    for name, requires in installed:
        toolkit = [Requirement(text) for text in requires if text.startswith("cuda-toolkit")]
        ctk = [r for r in toolkit if r.marker is not None and r.marker.evaluate({"extra": "ctk"})]
        assert ctk, f"{name} has no ctk extra bringing cuda-toolkit"
        for library, part in TOOLKIT_PARTS.items():
            assert any(part in r.extras for r in ctk), f"{name}[ctk] does not bring {library} (cuda-toolkit[{part}])"
