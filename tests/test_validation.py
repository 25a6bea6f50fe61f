"""Every class of bad input: the exception type, and a message that names the argument."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import deformcp


def _valid(rng) -> dict:
    """A valid call: groups 2, one offset group, padding 1 (so H_out, W_out = H, W)."""
    return dict(x=rng.standard_normal((2, 4, 6, 5)), offset=rng.standard_normal((2, 18, 6, 5)),
                mask=rng.uniform(size=(2, 9, 6, 5)), weight=rng.standard_normal((6, 2, 3, 3)),
                bias=rng.standard_normal(6), stride=1, padding=1, dilation=1)


def _forward(kw):
    return deformcp.deform_conv2d(kw["x"], kw["offset"], kw["mask"], kw["weight"], kw["bias"],
                                  stride=kw["stride"], padding=kw["padding"], dilation=kw["dilation"])


def _backward(kw, grad_out=None, wrt=("x", "offset", "mask", "weight", "bias")):
    if grad_out is None:
        # The valid call's output, in x's dtype where x has a floating one, so that each case
        # fails on the check it is about rather than on grad_out.
        x = kw["x"]
        floating = isinstance(x, np.ndarray) and x.dtype.kind == "f"
        grad_out = np.ones((2, 6, 6, 5), x.dtype.newbyteorder("=") if floating else np.float64)
    return deformcp.deform_conv2d_backward(grad_out, kw["x"], kw["offset"], kw["mask"], kw["weight"], kw["bias"],
                                           stride=kw["stride"], padding=kw["padding"], dilation=kw["dilation"],
                                           wrt=wrt)


def _im2col(kw):
    return deformcp.deform_im2col(kw["x"], kw["offset"], kw["mask"], 3, stride=kw["stride"],
                                  padding=kw["padding"], dilation=kw["dilation"])


def _with(**changes):
    """A modifier of the valid call; a callable value is applied to the valid array."""
    def apply(kw):
        for name, value in changes.items():
            kw[name] = value(kw[name]) if callable(value) else value
        return kw
    return apply


# (id, modifier, exception, message pattern, applies to deform_im2col)
CASES = [
    # wrong number of dimensions, each array
    ("x_ndim", _with(x=lambda a: a[0]), ValueError, r"\bx must be 4-D", True),
    ("offset_ndim", _with(offset=lambda a: a[0]), ValueError, r"\boffset must be 4-D", True),
    ("mask_ndim", _with(mask=lambda a: a[..., None]), ValueError, r"\bmask must be 4-D", True),
    ("weight_ndim", _with(weight=lambda a: a[0]), ValueError, r"\bweight must be 4-D", False),
    ("bias_ndim", _with(bias=lambda a: a[None]), ValueError, r"\bbias must be 1-D", False),
    # offset and mask shapes: batch, channels, spatial size
    ("offset_batch", _with(offset=lambda a: a[:1]), ValueError, r"\boffset must have shape", True),
    ("offset_channels_not_multiple", _with(offset=lambda a: a[:, :17]), ValueError,
     r"offset\.shape\[1\] must be a positive multiple of 2\*kh\*kw = 18", True),
    ("offset_height", _with(offset=lambda a: a[:, :, :5]), ValueError, r"\boffset must have shape", True),
    ("offset_width", _with(offset=lambda a: a[:, :, :, :4]), ValueError, r"\boffset must have shape", True),
    ("mask_batch", _with(mask=lambda a: a[:1]), ValueError, r"\bmask must have shape", True),
    ("mask_channels", _with(mask=lambda a: np.concatenate([a, a], axis=1)), ValueError, r"\bmask must have shape",
     True),
    ("mask_height", _with(mask=lambda a: a[:, :, :5]), ValueError, r"\bmask must have shape", True),
    ("mask_width", _with(mask=lambda a: a[:, :, :, 1:]), ValueError, r"\bmask must have shape", True),
    # channel divisibility
    ("channels_not_divisible_by_groups", _with(weight=lambda a: np.ones((6, 3, 3, 3))), ValueError,
     r"input channels \(4\) must be divisible by weight\.shape\[1\]", False),
    ("channels_not_divisible_by_offset_groups", _with(offset=lambda a: np.ones((2, 54, 6, 5))), ValueError,
     r"divisible by offset groups \(offset\.shape\[1\]", True),
    ("out_channels_not_divisible_by_groups", _with(weight=lambda a: a[:5], bias=lambda a: a[:5]), ValueError,
     r"output channels \(5\) must be divisible by groups \(2\)", False),
    ("bias_length", _with(bias=lambda a: a[:5]), ValueError, r"\bbias must have shape \(6,\)", False),
    # empty dimensions
    ("x_no_channels", _with(x=lambda a: a[:, :0]), ValueError, r"x\.shape\[1\]", True),
    ("x_no_rows", _with(x=lambda a: a[:, :, :0]), ValueError, r"x\.shape\[2\] \(height\) must be positive", True),
    ("x_no_columns", _with(x=lambda a: a[:, :, :, :0]), ValueError, r"x\.shape\[3\] \(width\)", True),
    ("weight_no_outputs", _with(weight=lambda a: a[:0]), ValueError, r"weight\.shape\[0\]", False),
    ("weight_no_kernel_rows", _with(weight=lambda a: a[:, :, :0]), ValueError, r"weight\.shape\[2\]", False),
    ("offset_no_channels", _with(offset=lambda a: a[:, :0]), ValueError,
     r"offset\.shape\[1\] must be a positive multiple", True),
    # stride, dilation, padding
    ("stride_zero", _with(stride=0), ValueError, r"\bstride must be >= 1", True),
    ("stride_negative", _with(stride=(1, -2)), ValueError, r"\bstride must be >= 1", True),
    ("dilation_zero", _with(dilation=0), ValueError, r"\bdilation must be >= 1", True),
    ("dilation_negative", _with(dilation=(-1, 1)), ValueError, r"\bdilation must be >= 1", True),
    ("padding_negative", _with(padding=-1), ValueError, r"\bpadding must be non-negative", True),
    ("padding_pair_negative", _with(padding=(1, -1)), ValueError, r"\bpadding must be non-negative", True),
    ("padding_four_negative", _with(padding=(1, 1, 1, -1)), ValueError, r"\bpadding must be non-negative", True),
    ("padding_three_values", _with(padding=(1, 1, 1)), ValueError, r"\bpadding must be an int or a tuple of 2 or 4",
     True),
    ("padding_one_value", _with(padding=(1,)), ValueError, r"\bpadding must be an int or a tuple of 2 or 4", True),
    ("stride_three_values", _with(stride=(1, 1, 1)), ValueError, r"\bstride must be an int or a tuple of 2", True),
    ("dilation_three_values", _with(dilation=[1, 1, 1]), ValueError, r"\bdilation must be an int or a tuple of 2",
     True),
    ("stride_float", _with(stride=1.0), TypeError, r"\bstride must be an int", True),
    ("padding_string", _with(padding="same"), TypeError, r"\bpadding must be an int", True),
    ("stride_bool", _with(stride=True), TypeError, r"\bstride must be an int, got bool", True),
    ("stride_bool_in_tuple", _with(stride=(1, True)), TypeError, r"\bstride must be an int, got bool", True),
    ("dilation_bool", _with(dilation=True), TypeError, r"\bdilation must be an int, got bool", True),
    ("padding_bool", _with(padding=False), TypeError, r"\bpadding must be an int, got bool", True),
    # kernel larger than the padded input: the message names both sizes
    ("kernel_larger_than_input", _with(x=lambda a: a[:, :, :2, :2], padding=0), ValueError,
     r"kernel \(3x3\) with dilation \(1, 1\) spans 3x3, larger than the padded input 2x2", True),
    ("dilated_kernel_larger_than_input", _with(dilation=(4, 1)), ValueError,
     r"kernel \(3x3\) with dilation \(4, 1\) spans 9x3, larger than the padded input 8x7", True),
    # dtypes
    ("mixed_dtypes", _with(x=lambda a: a.astype(np.float32)), TypeError,
     r"must share one dtype, got .*x=float32, offset=float64", True),
    ("mixed_half_dtypes", _with(mask=lambda a: a.astype(np.float16)), TypeError, r"mask=float16", True),
    ("int_x", _with(x=lambda a: a.astype(np.int64)), TypeError, r"\bx must be a floating array", True),
    ("int_offset", _with(offset=lambda a: a.astype(np.int32)), TypeError, r"\boffset must be a floating array", True),
    ("int_weight", _with(weight=lambda a: a.astype(np.int16)), TypeError, r"\bweight must be a floating array",
     False),
    ("bool_mask", _with(mask=lambda a: a > 0.5), TypeError, r"\bmask must be a floating array.*bool", True),
    ("complex_bias", _with(bias=lambda a: a.astype(np.complex128)), TypeError, r"\bbias must be a floating array",
     False),
    # not arrays
    ("list_x", _with(x=lambda a: a.tolist()), TypeError, r"\bx must be an array", True),
    ("list_weight", _with(weight=lambda a: a.tolist()), TypeError, r"\bweight must be an array", False),
    ("float_bias", _with(bias=1.5), TypeError, r"\bbias must be an array", False),
    ("none_x", _with(x=None), TypeError, r"\bx must be an array, got None", True),
    ("none_offset", _with(offset=None), TypeError, r"\boffset must be an array, got None", True),
    ("none_weight", _with(weight=None), TypeError, r"\bweight must be an array, got None", False),
    # byte order: named as the problem, with the conversion to use
    ("big_endian_x", _with(x=lambda a: a.astype(">f8")), TypeError, r"\bx has non-native byte order \(>f8\)", True),
    ("big_endian_all", _with(**{n: (lambda a: a.astype(">f8")) for n in ("x", "offset", "mask", "weight", "bias")}),
     TypeError, r"has non-native byte order", True),
]
CASE_PARAMS = [pytest.param(*case[1:4], id=case[0]) for case in CASES]
IM2COL_PARAMS = [pytest.param(*case[1:4], id=case[0]) for case in CASES if case[4]]


@pytest.mark.parametrize("modify, exception, message", CASE_PARAMS)
def test_forward_rejects(modify, exception, message, rng):
    with pytest.raises(exception, match=message):
        _forward(modify(_valid(rng)))


@pytest.mark.parametrize("modify, exception, message", CASE_PARAMS)
def test_backward_rejects(modify, exception, message, rng):
    with pytest.raises(exception, match=message):
        _backward(modify(_valid(rng)))


@pytest.mark.parametrize("modify, exception, message", IM2COL_PARAMS)
def test_im2col_rejects(modify, exception, message, rng):
    with pytest.raises(exception, match=message):
        _im2col(modify(_valid(rng)))


def test_valid_call_is_accepted(rng):
    # The baseline every case above modifies must itself be valid, or the cases prove nothing.
    kw = _valid(rng)
    assert _forward(kw).shape == (2, 6, 6, 5)
    assert _backward(kw).grad_x.shape == (2, 4, 6, 5)
    assert _im2col(kw).shape == (2, 36, 30)


@pytest.mark.parametrize("kernel_size, exception, message", [
    (0, ValueError, r"\bkernel_size must be >= 1"),
    ((3, 0), ValueError, r"\bkernel_size must be >= 1"),
    ((3, 3, 3), ValueError, r"\bkernel_size must be an int or a tuple of 2"),
    (True, TypeError, r"\bkernel_size must be an int, got bool"),
    (2.5, TypeError, r"\bkernel_size must be an int"),
    # a kernel size that does not match the offset's channels
    (2, ValueError, r"offset\.shape\[1\] must be a positive multiple of 2\*kh\*kw = 8"),
])
def test_im2col_rejects_kernel_size(kernel_size, exception, message, rng):
    kw = _valid(rng)
    with pytest.raises(exception, match=message):
        deformcp.deform_im2col(kw["x"], kw["offset"], kw["mask"], kernel_size, padding=1)


@pytest.mark.parametrize("wrt, message", [
    (("x", "weights"), r"wrt must name inputs among .*unknown \['weights'\]"),
    ("grad_x", r"unknown \['grad_x'\]"),
    (("input",), r"unknown \['input'\]"),
])
def test_backward_rejects_unknown_wrt(wrt, message, rng):
    with pytest.raises(ValueError, match=message):
        _backward(_valid(rng), wrt=wrt)


@pytest.mark.parametrize("wrt, message", [
    (None, r"wrt must be a name or an iterable of names among .*got NoneType None"),
    (123, r"wrt must be a name or an iterable of names among .*got int 123"),
    ((1, 2), r"wrt must name inputs among .* by string, got \[1, 2\]"),
])
def test_backward_rejects_wrt_of_the_wrong_type(wrt, message, rng):
    with pytest.raises(TypeError, match=message):
        _backward(_valid(rng), wrt=wrt)


def test_backward_rejects_none_grad_out(rng):
    kw = _valid(rng)
    with pytest.raises(TypeError, match=r"\bgrad_out must be an array, got None"):
        deformcp.deform_conv2d_backward(None, kw["x"], kw["offset"], kw["mask"], kw["weight"], kw["bias"], padding=1)


@pytest.mark.parametrize("shape", [(2, 6, 6, 4), (2, 6, 5, 5), (1, 6, 6, 5), (2, 5, 6, 5), (2, 6, 30), (2, 6, 6, 5, 1)])
def test_backward_rejects_grad_out_shape(shape, rng):
    with pytest.raises(ValueError, match=r"grad_out must have the output's shape \(2, 6, 6, 5\)"):
        _backward(_valid(rng), grad_out=np.ones(shape))


@pytest.mark.parametrize("grad_out, exception, message", [
    (np.ones((2, 6, 6, 5), np.float32), TypeError, r"grad_out=float32"),
    (np.ones((2, 6, 6, 5), np.int64), TypeError, r"\bgrad_out must be a floating array"),
    (np.ones((2, 6, 6, 5)).tolist(), TypeError, r"\bgrad_out must be an array"),
])
def test_backward_rejects_grad_out_type(grad_out, exception, message, rng):
    with pytest.raises(exception, match=message):
        _backward(_valid(rng), grad_out=grad_out)


# --- workspace limits -----------------------------------------------------------


@pytest.mark.parametrize("limit, exception, message", [
    (0, ValueError, r"nbytes must be a positive number of bytes, got 0"),
    (-4096, ValueError, r"nbytes must be a positive number of bytes"),
    ("lots", TypeError, r"nbytes must be an integer number of bytes, got str 'lots'"),
    ("100", TypeError, r"nbytes must be an integer number of bytes, got str '100'"),
    (100.0, TypeError, r"nbytes must be an integer number of bytes, got float 100.0"),
    (True, TypeError, r"nbytes must be an integer number of bytes, got bool True"),
    (None, TypeError, r"nbytes must be an integer number of bytes, got NoneType None"),
    ([4096], TypeError, r"nbytes must be an integer number of bytes"),
])
def test_invalid_workspace_limit(limit, exception, message):
    before = deformcp.get_workspace_limit()
    with pytest.raises(exception, match=message):
        deformcp.set_workspace_limit(limit)
    with pytest.raises(exception, match=message):
        with deformcp.workspace_limit(limit):
            pass
    assert deformcp.get_workspace_limit() == before, "a rejected limit must leave the limit unchanged"


@pytest.mark.parametrize("value, message", [("0", r"DEFORMCP_WORKSPACE_BYTES must be a positive"),
                                            ("-5", r"DEFORMCP_WORKSPACE_BYTES must be a positive"),
                                            ("1e9", r"DEFORMCP_WORKSPACE_BYTES must be an integer.*'1e9'"),
                                            ("plenty", r"DEFORMCP_WORKSPACE_BYTES must be an integer")])
def test_invalid_workspace_environment_variable(value, message):
    # The variable is read once, at import: a bad value must fail loudly there, naming the variable.
    env = {**os.environ, "DEFORMCP_WORKSPACE_BYTES": value}
    root = os.path.dirname(os.path.dirname(os.path.abspath(deformcp.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", "import deformcp"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert __import__("re").search(message, proc.stderr), proc.stderr[-2000:]
