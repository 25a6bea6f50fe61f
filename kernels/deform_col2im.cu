// Stage 2, the gradient with respect to the input: the exact transpose of the
// sampling, a scatter with atomic adds.
//
// One thread per element (image of the tile, channel c, kernel point k, tile
// pixel) of the column gradient; it adds (mask * weight) * gradient, grouped as
// torchvision groups it, to each of the (up to four) in-image pixels within
// distance 1 of the position (Cell::near).  Samples that took the early exit,
// or whose position is NaN, read nothing and so scatter nothing.  grad_input is
// the whole [B, C, H, W] gradient in acc_t (float32 for the half types).
#include "deform_common.cuh"

template <typename scalar_t, typename index_t>
__global__ void deform_col2im_kernel(index_t n, const dcn::acc_t<scalar_t>* __restrict__ grad_columns,
                                     const scalar_t* __restrict__ offset,
                                     const scalar_t* __restrict__ mask, index_t has_mask,
                                     dcn::acc_t<scalar_t>* __restrict__ grad_input,
                                     DCN_GEOMETRY_PARAMS(index_t)) {
    using acc = dcn::acc_t<scalar_t>;
    const dcn::Geometry<index_t> g = DCN_GEOMETRY(index_t);
    const index_t points = g.kernel_points();
    DCN_GRID_STRIDE_LOOP(index_t, idx, n) {
        const dcn::TileItem<index_t> t(g, idx, g.channels, points);
        const index_t c = t.outer;
        const index_t group = c / g.channels_per_offset_group();
        const dcn::Sample<scalar_t, index_t> s(g, offset, mask, has_mask != 0, t.b, group, t.k, t.oy, t.ox);
        if (dcn::outside(s.y, s.x, g.height, g.width) || isnan(s.y) || isnan(s.x)) continue;
        const acc grad = grad_columns[g.column_at(t.image, c * points + t.k, t.p)];
        const dcn::Cell<acc, index_t> cell(s.y, s.x, g.height, g.width);
        acc* plane = grad_input + (t.b * g.channels + c) * g.height * g.width;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            if (cell.inside[q] && cell.near(q)) {
                dcn::atomic_accumulate<scalar_t>(plane + cell.index[q], (s.mask * cell.weight(q)) * grad);
            }
        }
    }
}
