"""Side by side: deformcp against other implementations of deformable convolution ("peers").

``python -m benchmarks.compare`` (:mod:`.cli`), run from a clone of the repository,
runs deformcp and each installed peer in one process on the same random inputs,
checks that their outputs agree with deformcp's, times them (warm-up, then the
median of interleaved runs) and writes a table, a JSON file and a plot of the
ratios.  ``docs/benchmarks.md`` describes what is measured and how.  It is not
part of the installed package: it needs the ``bench`` extra's peers.

Modules: ``benchmarks.shapes`` (geometries and inputs, shared with the asv suite),
:mod:`.peers` (the registry; one module per peer), :mod:`.machine`, :mod:`.timing`,
:mod:`.memory`, :mod:`.agreement`, :mod:`.targets`, :mod:`.report`, :mod:`.cli`.

asv imports every module under ``benchmarks/`` when it looks for benchmarks, so
these modules import only the standard library, NumPy and deformcp's public API at
import time (the peers' libraries when a peer is prepared), and no name here starts
with an asv prefix (``time_``, ``mem_``, ``peakmem_``, ``track_``).
"""
