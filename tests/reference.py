"""The tests' float64 oracle: the brute-force loop reference shipped in :mod:`deformcp.reference`."""

from deformcp.reference import deform_conv2d, deform_conv2d_backward, im2col  # noqa: F401
