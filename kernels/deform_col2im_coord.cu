// Stage 3, the gradients with respect to offset and mask.
//
// One thread per sample (image of the tile, offset group, kernel point, tile
// pixel); it sums over the group's channels, for each of the four corners,
// s[q] = sum_c grad_column[c] * input[c, corner q], then
//   d/dy    = mask * ((1 - lx) (s2 - s0) + lx (s3 - s1))
//   d/dx    = mask * ((1 - ly) (s1 - s0) + ly (s3 - s2))
//   d/dmask = sum_q bilinear_weight[q] * s[q]   (0 for a sample that takes the early exit)
// The coordinate derivative has no early exit: corners inside the image count
// even when the sample itself is outside, so it is non-zero on the lines
// y = -1 and x = -1, torchvision's rule.  Each output element is written once.
#include "deform_common.cuh"

template <typename scalar_t, typename index_t>
__global__ void deform_col2im_coord_kernel(index_t n, const dcn::acc_t<scalar_t>* __restrict__ grad_columns,
                                           const scalar_t* __restrict__ input,
                                           const scalar_t* __restrict__ offset,
                                           const scalar_t* __restrict__ mask, index_t has_mask,
                                           scalar_t* __restrict__ grad_offset, index_t want_offset,
                                           scalar_t* __restrict__ grad_mask, index_t want_mask,
                                           DCN_GEOMETRY_PARAMS(index_t)) {
    using acc = dcn::acc_t<scalar_t>;
    const dcn::Geometry<index_t> g = DCN_GEOMETRY(index_t);
    const index_t points = g.kernel_points();
    const index_t per_group = g.channels_per_offset_group();
    DCN_GRID_STRIDE_LOOP(index_t, idx, n) {
        const dcn::TileItem<index_t> t(g, idx, g.offset_groups, points);
        const index_t group = t.outer;
        const dcn::Sample<scalar_t, index_t> s(g, offset, mask, has_mask != 0, t.b, group, t.k, t.oy, t.ox);
        const dcn::Cell<acc, index_t> cell(s.y, s.x, g.height, g.width);

        acc sum[4] = {acc(0), acc(0), acc(0), acc(0)};
        for (index_t cc = 0; cc < per_group; ++cc) {
            const index_t c = group * per_group + cc;
            const acc grad = grad_columns[g.column_at(t.image, c * points + t.k, t.p)];
            const scalar_t* plane = input + (t.b * g.channels + c) * g.height * g.width;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                if (cell.inside[q]) sum[q] += dcn::load(plane + cell.index[q]) * grad;
            }
        }

        if (want_offset) {
            const acc d_y = (acc(1) - cell.lx) * (sum[2] - sum[0]) + cell.lx * (sum[3] - sum[1]);
            const acc d_x = (acc(1) - cell.ly) * (sum[1] - sum[0]) + cell.ly * (sum[3] - sum[2]);
            dcn::store(grad_offset + s.offset_at, s.mask * d_y);
            dcn::store(grad_offset + s.offset_at + g.out_pixels(), s.mask * d_x);
        }
        if (want_mask) {
            // The sample's own value, early exit included: 0 outside, even when a corner
            // it would touch (on a -1 line) holds NaN.  Multiplying by the inside flag
            // rather than skipping the corner keeps a NaN position NaN.
            acc d_mask = 0;
            if (!dcn::outside(s.y, s.x, g.height, g.width)) {
#pragma unroll
                for (int q = 0; q < 4; ++q) d_mask += cell.weight(q) * acc(cell.inside[q] ? 1 : 0) * sum[q];
            }
            dcn::store(grad_mask + s.mask_at, d_mask);
        }
    }
}
