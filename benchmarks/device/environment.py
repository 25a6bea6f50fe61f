"""What the machine has, as JSON: ``python -m benchmarks.device.environment OUT.json``.

The GPU (name, memory, compute capability, multiprocessors), the driver, the CUDA runtime
and NVRTC CuPy loaded, whether CuPy has bfloat16 here, the versions of every library the
GPU path and the comparisons use, the CUDA tools (``nvidia-smi``, ``nvcc``,
``compute-sanitizer``) and the CPUs.  It works on any machine: whatever is missing is
recorded with the reason, and ``cuda_device`` is then ``None`` with ``no_cuda_reason``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

__all__ = ["DISTRIBUTIONS", "describe", "find_cuda_tool", "main"]

# Everything whose version bears on the GPU path, the tests or the comparisons.
DISTRIBUTIONS = (
    "numpy", "scipy", "ml_dtypes", "threadpoolctl", "cupy-cuda13x", "cupy-cuda12x", "cuda-pathfinder",
    "cuda-toolkit", "nvidia-cublas", "nvidia-cuda-nvrtc", "nvidia-cuda-runtime", "nvidia-cublas-cu12",
    "nvidia-cuda-nvrtc-cu12", "nvidia-cuda-runtime-cu12", "torch", "torchvision", "jax", "jaxlib",
    "jax-cuda13-plugin", "jax-cuda12-plugin", "onnxruntime", "openvino", "pytest", "pytest-xdist", "hypothesis",
)
TOOL_TIMEOUT_S = 30


def _versions() -> dict:
    found = {}
    for name in DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def find_cuda_tool(name: str) -> Optional[str]:
    """The path of a CUDA tool: on the PATH, else in the ``bin`` of ``CUDA_HOME``, ``CUDA_PATH`` or /usr/local/cuda."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return shutil.which(name) or next(
        (str(Path(root, "bin", name)) for root in roots if root and Path(root, "bin", name).is_file()), None)


def _tool(command: List[str], keep: Optional[str] = None) -> dict:
    """A CUDA tool's path and what it says about itself (the lines containing ``keep``, or all)."""
    path = find_cuda_tool(command[0])
    if path is None:
        return {"path": None,
                "reason": f"{command[0]} is neither on the PATH nor in CUDA_HOME/bin or /usr/local/cuda/bin"}
    try:
        run = subprocess.run([path, *command[1:]], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"path": path, "reason": f"{type(error).__name__}: {error}"}
    lines = [line.strip() for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    if keep is not None:
        lines = [line for line in lines if keep in line]
    return {"path": path, "exit_status": run.returncode, "says": lines}


def _cupy() -> dict:
    try:
        import cupy
    except Exception as error:  # ImportError, or a CuPy that cannot load its CUDA libraries
        return {"reason": f"CuPy cannot be imported ({type(error).__name__}: {error})"}
    found = {"version": cupy.__version__}
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CUDARuntimeError without a driver or device
        found["reason"] = f"CuPy sees no CUDA device ({type(error).__name__}: {error})"
        return found
    if count < 1:
        found["reason"] = "CuPy sees no CUDA device"
        return found
    from deformcp.interop import cupy_bfloat16_missing

    properties = cupy.cuda.runtime.getDeviceProperties(0)
    free, total = cupy.cuda.Device(0).mem_info
    nvrtc = cupy.cuda.nvrtc.getVersion()
    found.update(
        devices=count, name=properties["name"].decode(),
        compute_capability=f"{properties['major']}.{properties['minor']}",
        multiprocessors=int(properties["multiProcessorCount"]), memory_bytes=int(total), free_bytes=int(free),
        driver=cupy.cuda.runtime.driverGetVersion(), runtime=cupy.cuda.runtime.runtimeGetVersion(),
        nvrtc=f"{nvrtc[0]}.{nvrtc[1]}", cuda_path=cupy.cuda.get_cuda_path(),
        bfloat16=cupy_bfloat16_missing() or "yes",
    )
    return found


def _torch() -> dict:
    try:
        import torch
    except Exception as error:
        return {"reason": f"PyTorch cannot be imported ({type(error).__name__}: {error})"}
    found = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if found["cuda_available"]:
        found["device"] = torch.cuda.get_device_name(0)
    return found


def _jax() -> dict:
    try:
        import jax
    except Exception as error:
        return {"reason": f"JAX cannot be imported ({type(error).__name__}: {error})"}
    try:
        return {"version": jax.__version__, "default_backend": jax.default_backend(),
                "devices": [str(d) for d in jax.devices()]}
    except RuntimeError as error:
        return {"version": jax.__version__, "reason": str(error)}


def describe() -> dict:
    """Everything above, as one JSON-able dict; ``cuda_device`` is the GPU's name, or ``None``."""
    from benchmarks.compare.machine import deformcp_version
    from benchmarks.compare.machine import cpu_threads

    cupy = _cupy()
    return {
        "deformcp": deformcp_version(),
        "python": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "machine": f"{platform.machine()} {platform.processor() or platform.platform()}",
        "cpu_threads": cpu_threads(), "cpu_count": os.cpu_count(),
        "cuda_device": cupy.get("name"),
        "no_cuda_reason": cupy.get("reason"),
        "cupy": cupy, "torch": _torch(), "jax": _jax(),
        "tools": {
            "nvidia-smi": _tool(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                 "--format=csv,noheader"]),
            "nvcc": _tool(["nvcc", "--version"], keep="release"),
            "compute-sanitizer": _tool(["compute-sanitizer", "--version"], keep="Version"),
        },
        "environment_variables": {name: os.environ.get(name) for name in (
            "CUPY_CACHE_DIR", "CUPY_TF32", "XLA_PYTHON_CLIENT_PREALLOCATE", "CUDA_VISIBLE_DEVICES",
            "DEFORMCP_NUM_THREADS", "DEFORMCP_WORKSPACE_BYTES")},
        "versions": _versions(),
    }


def main(argv: List[str]) -> int:
    """Write :func:`describe` to the JSON file named by the one argument."""
    if len(argv) != 1:
        print("usage: python -m benchmarks.device.environment OUT.json", file=sys.stderr)
        return 2
    Path(argv[0]).write_text(json.dumps(describe(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
