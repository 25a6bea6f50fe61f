"""The workspace limit: tiled results equal untiled ones; plan_tiles covers the output once and
respects the limit; the limit's getters, setter, context manager and environment variable."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import deformcp
from deformcp.backends import numpy_backend, numpy_grid, numpy_sampling, numpy_tiling
from deformcp.geometry import conv_geometry
from deformcp.workspace import DEFAULT_WORKSPACE_BYTES, Tile, plan_tiles
from problems import INPUT_NAMES, Spec, make_problem, relative_error, run_backward, run_forward, run_im2col

SPECS = [pytest.param(s, id=n) for n, s in {
    "groups": Spec(batch=3, in_channels=4, out_channels=6, groups=2, offset_groups=2, height=9, width=7),
    "strided": Spec(batch=3, in_channels=2, out_channels=3, height=11, width=8, stride=(2, 1), dilation=(1, 2),
                    padding=(0, 2, 1, 1), kernel=(3, 2), bias=False),
}.items()]
OPERATIONS = {
    "forward": lambda p: {"out": run_forward(p)},
    "backward": lambda p: {f"grad_{n}": g for n, g in run_backward(p).items() if g is not None},
    "im2col": lambda p: {"columns": run_im2col(p)},
}


@pytest.fixture
def recorded_plans(monkeypatch):
    """Every ``plan_tiles`` call the CPU backend makes: a list of (arguments, tiles)."""
    calls = []

    def spy(*args, **kwargs):
        tiles = plan_tiles(*args, **kwargs)
        calls.append(((args, kwargs), tiles))
        return tiles

    monkeypatch.setattr(numpy_tiling, "plan_tiles", spy)
    return calls


def _untiled(problem, operation, monkeypatch, recorded_plans):
    monkeypatch.setenv("DEFORMCP_NUM_THREADS", "1")
    with deformcp.workspace_limit(2**40):
        result = OPERATIONS[operation](problem)
    (args, kwargs), tiles = recorded_plans.pop()
    assert len(tiles) == 1, "the baseline must be a single tile"
    return result, args


def _assert_same(tiled, untiled):
    for name, value in untiled.items():
        err = relative_error(tiled[name], value)
        assert err <= 1e-12, f"{name}: tiled vs untiled relative error {err:.3g}"


@pytest.mark.parametrize("threads", ["4", "7"])
@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize("spec", SPECS)
def test_row_bands_equal_untiled(spec, operation, threads, rng, monkeypatch, recorded_plans):
    problem = make_problem(spec, rng)
    untiled, _ = _untiled(problem, operation, monkeypatch, recorded_plans)
    monkeypatch.setenv("DEFORMCP_NUM_THREADS", threads)
    with deformcp.workspace_limit(4096):
        tiled = OPERATIONS[operation](problem)
    (_, tiles), = recorded_plans
    # More threads than images: single images in bands of rows, some shorter than the image,
    # at least one tile per thread.
    assert all(t.images == 1 for t in tiles)
    assert any(t.out_rows < spec.out_size[0] for t in tiles)
    assert len(tiles) >= int(threads)
    _assert_same(tiled, untiled)


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_a_limit_below_one_image_gives_whole_images_not_bands(operation, rng, monkeypatch, recorded_plans,
                                                             recorded_chunks):
    # A band needs its whole image's copy, so cutting bands would save nothing: under a tiny
    # limit each tile is one whole image, and the chunks (one row each) bound the rest.
    problem = make_problem(SPECS[0].values[0], rng)
    monkeypatch.setenv("DEFORMCP_NUM_THREADS", "1")
    with deformcp.workspace_limit(1):
        OPERATIONS[operation](problem)
    (_, tiles), = recorded_plans
    out_h = problem.spec.out_size[0]
    assert [(t.batch_start, t.batch_stop, t.row_start, t.row_stop) for t in tiles] == [
        (b, b + 1, 0, out_h) for b in range(problem.spec.batch)]
    assert recorded_chunks and all(c.images == 1 and c.out_rows == 1 for c in recorded_chunks)


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize("spec", SPECS)
def test_batch_tiles_equal_untiled(spec, operation, threads, rng, monkeypatch, recorded_plans):
    problem = make_problem(spec, rng)
    untiled, _ = _untiled(problem, operation, monkeypatch, recorded_plans)
    # One-row chunks, and a limit that holds them and two whole images per tile
    # (the backend shares the limit among its threads).
    monkeypatch.setattr(numpy_tiling, "_CHUNK_SAMPLES", 1)
    per_pixel, per_image = _scratch_bytes(problem, operation)
    chunk_bytes = per_pixel * spec.out_size[1]
    monkeypatch.setenv("DEFORMCP_NUM_THREADS", threads)
    with deformcp.workspace_limit((2 * per_image + chunk_bytes) * int(threads)):
        tiled = OPERATIONS[operation](problem)
    (_, tiles), = recorded_plans
    # Two images fit a tile; with two threads, min_tiles=2 splits the 3 images so each thread has one.
    expected = [(0, 2), (2, 3)] if threads == "1" else [(0, 1), (1, 2), (2, 3)]
    assert [(t.batch_start, t.batch_stop) for t in tiles] == expected
    assert all((t.row_start, t.row_stop) == (0, spec.out_size[0]) for t in tiles)
    _assert_same(tiled, untiled)


@pytest.fixture
def recorded_chunks(monkeypatch):
    """Every chunk the CPU backend walks: a list of Tiles."""
    chunks = []
    original = numpy_tiling.Tiling.chunks

    def spy(self, tile):
        result = original(self, tile)
        chunks.extend(result)
        return result

    monkeypatch.setattr(numpy_tiling.Tiling, "chunks", spy)
    return chunks


@pytest.mark.parametrize("chunk_images", [False, True], ids=["row-chunks", "image-chunks"])
@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize("spec", SPECS)
def test_chunks_equal_untiled(spec, operation, chunk_images, rng, monkeypatch, recorded_plans, recorded_chunks):
    problem = make_problem(spec, rng)
    untiled, _ = _untiled(problem, operation, monkeypatch, recorded_plans)
    assert len(recorded_chunks) == 1, "the baseline must be a single chunk"
    recorded_chunks.clear()
    out_h, out_w = spec.out_size
    k = spec.kernel[0] * spec.kernel[1] * spec.offset_groups
    # Samples for two output rows of one image, or for two whole images.
    monkeypatch.setattr(numpy_tiling, "_CHUNK_SAMPLES", 2 * k * out_w * (out_h if chunk_images else 1))
    with deformcp.workspace_limit(2**40):
        chunked = OPERATIONS[operation](problem)
    if chunk_images:
        assert [(c.batch_start, c.batch_stop) for c in recorded_chunks] == [(0, 2), (2, 3)]
    else:
        assert all(c.images == 1 and c.out_rows <= 2 for c in recorded_chunks)
        assert len(recorded_chunks) == spec.batch * -(-out_h // 2)
    _assert_same(chunked, untiled)


@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize("spec", SPECS)
def test_blocked_channels_last_copy_equals_untiled(spec, operation, rng, monkeypatch, recorded_plans):
    # The channels-last copy goes in blocks of (pixels, channels); blocks smaller than the
    # image and the channels, with ragged edges, must give the same copy.
    problem = make_problem(spec, rng)
    untiled, _ = _untiled(problem, operation, monkeypatch, recorded_plans)
    monkeypatch.setattr(numpy_grid, "_TRANSPOSE_BLOCK", (5, 3))
    with deformcp.workspace_limit(2**40):
        _assert_same(OPERATIONS[operation](problem), untiled)


@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize("spec", SPECS)
def test_public_sparse_operator_fallback_equals_kernels(spec, operation, rng, monkeypatch):
    # SciPy's private CSR/CSC kernels are used where they exist; the public operator must give
    # the same results should a SciPy release move them.
    problem = make_problem(spec, rng)
    monkeypatch.setattr(numpy_tiling, "_CHUNK_SAMPLES", 1)
    direct = OPERATIONS[operation](problem)
    monkeypatch.setattr(numpy_sampling, "_csr_matvecs", None)
    monkeypatch.setattr(numpy_sampling, "_csc_matvecs", None)
    fallback = OPERATIONS[operation](problem)
    _assert_same(fallback, direct)


def _geometry(problem):
    """The validated geometry of ``problem``'s deform_conv2d call."""
    shape = lambda a: None if a is None else a.shape  # noqa: E731
    return conv_geometry(problem.x.shape, problem.offset.shape, shape(problem.mask), problem.weight.shape,
                         shape(problem.bias), **problem.spec.kwargs)


def _scratch_bytes(problem, operation):
    """The CPU backend's (bytes per chunk pixel, bytes per tile image) for ``operation`` on ``problem``."""
    return numpy_tiling.scratch_bytes(_geometry(problem), problem.x.dtype, backward=operation == "backward")


def test_limit_below_one_row_still_works(rng, monkeypatch):
    # The smallest pieces are one image's copy and one output row; a limit below them is
    # exceeded, not an error.
    problem = make_problem(Spec(batch=2, height=4, width=4), rng)
    monkeypatch.setenv("DEFORMCP_NUM_THREADS", "1")
    for operation in OPERATIONS.values():
        with deformcp.workspace_limit(1):
            small = operation(problem)
        with deformcp.workspace_limit(2**40):
            _assert_same(small, operation(problem))


@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize("spec", SPECS)
def test_int64_indices_equal_int32(spec, operation, rng, monkeypatch):
    # Indices switch to int64 where a tile's or a chunk's counts would overflow int32; lowering
    # the threshold runs that path on small problems.
    problem = make_problem(spec, rng)
    int32 = OPERATIONS[operation](problem)
    monkeypatch.setattr(numpy_tiling, "_INT32_INDEX_MAX", 10)
    seen = []
    original = numpy_sampling.sampling_plan
    monkeypatch.setattr(numpy_tiling, "sampling_plan",
                        lambda *a, **kw: seen.append(kw["index_dtype"]) or original(*a, **kw))
    _assert_same(OPERATIONS[operation](problem), int32)
    assert seen and all(np.dtype(t) == np.int64 for t in seen)


def test_the_sampling_plan_refuses_an_index_type_too_small(rng):
    problem = make_problem(SPECS[0].values[0], rng)
    with pytest.raises(OverflowError, match="int16"):
        numpy_sampling.sampling_plan(_geometry(problem), problem.offset, problem.mask, row_start=0, first_image=0,
                                     group_rows=40000, dtype=np.float64, index_dtype=np.int16,
                                     coordinate_corner=False)


@pytest.mark.parametrize("spec", SPECS)
def test_corner_gradient_blocks_equal_one_block(spec, rng, monkeypatch):
    # The corner gradients gather in blocks; tiny blocks (one sample, and a short last block)
    # must give what one block gives.
    problem = make_problem(spec, rng)
    whole = OPERATIONS["backward"](problem)
    for block_bytes in (1, 100):
        monkeypatch.setattr(numpy_backend, "_CORNER_BLOCK_BYTES", block_bytes)
        _assert_same(OPERATIONS["backward"](problem), whole)


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_chunks_respect_the_column_bytes_cap(operation, rng, monkeypatch, recorded_chunks):
    problem = make_problem(SPECS[0].values[0], rng)
    spec = problem.spec
    out_h, out_w = spec.out_size
    k = spec.kernel[0] * spec.kernel[1]
    row_bytes = out_w * k * spec.in_channels * 8  # float64 columns of one output row
    monkeypatch.setattr(numpy_tiling, "_CHUNK_COLUMN_BYTES", 3 * row_bytes)
    monkeypatch.setenv("DEFORMCP_NUM_THREADS", "1")
    OPERATIONS[operation](problem)
    assert recorded_chunks and max(c.images * c.out_rows for c in recorded_chunks) == min(3, out_h)


# --- plan_tiles -----------------------------------------------------------------

PLAN_ARGS = dict(batch=st.integers(0, 6), out_h=st.integers(1, 9), out_w=st.integers(1, 9),
                 bytes_per_pixel=st.integers(1, 1000), bytes_per_image=st.integers(0, 5000),
                 limit=st.integers(1, 200_000), min_tiles=st.integers(1, 4))


def _covered_once(tiles, batch, out_h):
    seen = np.zeros((batch, out_h), int)
    for t in tiles:
        assert t.images >= 1 and t.out_rows >= 1, f"empty tile {t}"
        seen[t.batch, t.rows] += 1
    return (seen == 1).all()


@settings(max_examples=300, deadline=None)
@given(**PLAN_ARGS)
def test_plan_tiles_covers_and_respects_the_limit(batch, out_h, out_w, bytes_per_pixel, bytes_per_image, limit,
                                                  min_tiles):
    tiles = plan_tiles(batch, out_h, out_w, bytes_per_pixel, bytes_per_image, limit=limit, min_tiles=min_tiles)
    assert _covered_once(tiles, batch, out_h), "every (image, output row) exactly once"
    image_bytes = bytes_per_image + bytes_per_pixel * out_h * out_w
    for t in tiles:
        whole = (t.row_start, t.row_stop) == (0, out_h)
        assert whole or t.images == 1, f"a band of rows spans one image: {t}"
        cost = t.images * bytes_per_image + t.images * t.out_rows * out_w * bytes_per_pixel
        # Over the limit only as the smallest possible tile: one row of one image.
        assert cost <= limit or (t.images == 1 and t.out_rows == 1), f"{t} needs {cost} > {limit} bytes"
    if image_bytes <= limit and batch >= min_tiles:
        assert all((t.row_start, t.row_stop) == (0, out_h) for t in tiles), "whole images where one fits"


@settings(max_examples=300, deadline=None)
@given(**PLAN_ARGS)
def test_plan_tiles_are_as_large_as_the_limit_allows(batch, out_h, out_w, bytes_per_pixel, bytes_per_image, limit,
                                                     min_tiles):
    # With one worker (min_tiles=1) nothing is split that need not be: one more image (or row)
    # in any tile but the last of its image or batch would break the limit.
    tiles = plan_tiles(batch, out_h, out_w, bytes_per_pixel, bytes_per_image, limit=limit)
    image_bytes = bytes_per_image + bytes_per_pixel * out_h * out_w
    for t, following in zip(tiles, tiles[1:]):
        if t.batch_stop == following.batch_stop:          # bands of the same image
            assert bytes_per_image + (t.out_rows + 1) * out_w * bytes_per_pixel > limit, f"band {t} could be taller"
        elif (t.row_start, t.row_stop) == (0, out_h) and following.batch_start == t.batch_stop:
            assert (t.images + 1) * image_bytes > limit, f"tile {t} could hold another image"


@settings(max_examples=300, deadline=None)
@given(**PLAN_ARGS)
def test_plan_tiles_min_tiles_reached_where_the_shape_allows(batch, out_h, out_w, bytes_per_pixel, bytes_per_image,
                                                             limit, min_tiles):
    # The documented promise: "at least this many tiles (one per worker thread)", where the
    # shape allows, i.e. up to one tile per output row of every image.
    tiles = plan_tiles(batch, out_h, out_w, bytes_per_pixel, bytes_per_image, limit=limit, min_tiles=min_tiles)
    assert len(tiles) >= min(min_tiles, batch * out_h), f"{len(tiles)} tiles: {tiles}"


def test_plan_tiles_examples():
    # Hand-worked: each image needs 100 + 10 * 3 * 4 = 220 bytes.
    assert plan_tiles(5, 3, 4, 10, 100, limit=440) == [Tile(0, 2, 0, 3), Tile(2, 4, 0, 3), Tile(4, 5, 0, 3)]
    # 219 bytes: no whole image; 100 + 40 * rows <= 219 gives bands of 2 rows.
    assert plan_tiles(2, 3, 4, 10, 100, limit=219) == [Tile(0, 1, 0, 2), Tile(0, 1, 2, 3),
                                                       Tile(1, 2, 0, 2), Tile(1, 2, 2, 3)]
    assert plan_tiles(0, 3, 4, 10, 100, limit=219) == []
    # The default limit is the global one.
    with deformcp.workspace_limit(440):
        assert plan_tiles(5, 3, 4, 10, 100) == plan_tiles(5, 3, 4, 10, 100, limit=440)


# --- the limit itself -----------------------------------------------------------


def test_set_returns_previous_and_context_restores():
    start = deformcp.get_workspace_limit()
    assert deformcp.set_workspace_limit(12345) == start
    assert deformcp.get_workspace_limit() == 12345
    with deformcp.workspace_limit(999):
        assert deformcp.get_workspace_limit() == 999
        with deformcp.workspace_limit(55):
            assert deformcp.get_workspace_limit() == 55
        assert deformcp.get_workspace_limit() == 999
    assert deformcp.get_workspace_limit() == 12345
    with pytest.raises(RuntimeError, match="inside"):
        with deformcp.workspace_limit(77):
            raise RuntimeError("inside")
    assert deformcp.get_workspace_limit() == 12345


@pytest.mark.parametrize("value, expected", [(None, DEFAULT_WORKSPACE_BYTES), ("8192", 8192)])
def test_environment_variable_sets_the_initial_limit(value, expected):
    env = {k: v for k, v in os.environ.items() if k != "DEFORMCP_WORKSPACE_BYTES"}
    if value is not None:
        env["DEFORMCP_WORKSPACE_BYTES"] = value
    root = os.path.dirname(os.path.dirname(os.path.abspath(deformcp.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", "import deformcp; print(deformcp.get_workspace_limit())"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout) == expected
    assert DEFAULT_WORKSPACE_BYTES == 256 * 2**20
