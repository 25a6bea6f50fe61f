// Stage 3, the gradients with respect to offset and mask.
//
// One thread per sample (image of the tile, offset group, kernel point, tile
// pixel); it sums over the group's channels c, with v_q the value of corner q
// (0 outside the image) and g the column gradient,
//   d/dy    += (mask * ((1 - lx) (v2 - v0) + lx (v3 - v1))) * g
//   d/dx    += (mask * ((1 - ly) (v1 - v0) + ly (v3 - v2))) * g
//   d/dmask += g * value,   value = sum_q weight_q v_q, 0 for a sample that takes the early exit
// with the products grouped as torchvision groups them, so that NaN and Inf in
// the column gradient, the mask or the input land where they land there.
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

        const bool early_exit = dcn::outside(s.y, s.x, g.height, g.width);
        acc d_y = 0, d_x = 0, d_mask = 0;
        for (index_t cc = 0; cc < per_group; ++cc) {
            const index_t c = group * per_group + cc;
            const acc grad = grad_columns[g.column_at(t.image, c * points + t.k, t.p)];
            const scalar_t* plane = input + (t.b * g.channels + c) * g.height * g.width;
            acc v[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) v[q] = cell.inside[q] ? dcn::load(plane + cell.index[q]) : acc(0);
            d_y += (s.mask * (cell.lx * (v[3] - v[1]) + (acc(1) - cell.lx) * (v[2] - v[0]))) * grad;
            d_x += (s.mask * (cell.ly * (v[3] - v[2]) + (acc(1) - cell.ly) * (v[1] - v[0]))) * grad;
            // The sample's own value, early exit included: 0 outside, even when a corner
            // it would touch (on a -1 line) holds NaN.
            const acc value = early_exit ? acc(0)
                : cell.weight(0) * v[0] + cell.weight(1) * v[1] + cell.weight(2) * v[2] + cell.weight(3) * v[3];
            d_mask += grad * value;
        }
        if (want_offset) {
            dcn::store(grad_offset + s.offset_at, d_y);
            dcn::store(grad_offset + s.offset_at + g.out_pixels(), d_x);
        }
        if (want_mask) dcn::store(grad_mask + s.mask_at, d_mask);
    }
}
