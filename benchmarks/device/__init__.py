"""The steps of ``benchmarks/device_check.py``, each run as its own process with its own time box.

``python benchmarks/device_check.py --out DIR`` (from the clone's root, with ``PYTHONPATH=.``)
is the first command to run on a machine lent a GPU; it runs these modules:

:mod:`.environment`
    what the machine has: GPU, driver, CUDA, the libraries and their versions.
:mod:`.kernels`
    the compile (or disk-cache load) time of every kernel instance.
:mod:`.workload`
    a small forward and backward in every dtype and index width, for compute-sanitizer.
:mod:`.speed`
    deformcp against ``torchvision.ops.deform_conv2d``, and through its PyTorch and JAX
    adapters: CUDA-event times and peak device memory.
:mod:`.record`
    the readable record (``record.md``) of what ran.

asv imports every module under ``benchmarks/`` when it looks for benchmarks, so these
import only the standard library and NumPy at import time (CuPy, PyTorch and JAX inside
their functions) and no name starts with an asv prefix (``time_``, ``mem_``,
``peakmem_``, ``track_``).
"""
