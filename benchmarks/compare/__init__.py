"""Side by side: deformcp against other implementations of deformable convolution ("peers").

``python -m deformcp bench`` (:mod:`.cli`) runs deformcp and each installed peer in
one process on the same random inputs, checks that their outputs agree with
deformcp's, times them (warm-up, then the median of interleaved runs) and writes a
table, a JSON file and a plot of the ratios.  ``docs/benchmarks.md`` describes
what is measured and how.

Modules: :mod:`.shapes` (geometries and inputs, shared with the asv suite),
:mod:`.peers` (the registry; one module per peer), :mod:`.timing`,
:mod:`.memory`, :mod:`.agreement`, :mod:`.targets`, :mod:`.report`, :mod:`.cli`.
"""
