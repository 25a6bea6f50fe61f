// Stage 1, forward sampling: the deformable im2col, mask applied.
//
// One thread per (image of the tile, input channel, tile pixel); it writes the
// kh*kw samples of that channel at that pixel to rows c*K .. c*K + K-1 of the
// column matrix (see DCN_GEOMETRY_PARAMS for the layout).  The columns are
// stored in acc_t: a convolution multiplies them by the weight before any
// rounding to a half type.
#include "deform_common.cuh"

template <typename scalar_t, typename index_t>
__global__ void deform_im2col_kernel(index_t n, const scalar_t* __restrict__ input,
                                     const scalar_t* __restrict__ offset,
                                     const scalar_t* __restrict__ mask, index_t has_mask,
                                     dcn::acc_t<scalar_t>* __restrict__ columns,
                                     DCN_GEOMETRY_PARAMS(index_t)) {
    const dcn::Geometry<index_t> g = DCN_GEOMETRY(index_t);
    const index_t points = g.kernel_points();
    DCN_GRID_STRIDE_LOOP(index_t, idx, n) {
        const dcn::TileItem<index_t> t(g, idx, g.channels, 1);
        const index_t c = t.outer;
        const index_t group = c / g.channels_per_offset_group();
        const scalar_t* plane = input + (t.b * g.channels + c) * g.height * g.width;
        dcn::acc_t<scalar_t>* out = columns + g.column_at(t.image, c * points, t.p);
        for (index_t k = 0; k < points; ++k) {
            const dcn::Sample<scalar_t, index_t> s(g, offset, mask, has_mask != 0, t.b, group, k, t.oy, t.ox);
            // A NaN mask poisons even an outside sample (mask * 0), as in torchvision.
            out[k * g.col_row_stride] = s.mask * dcn::bilinear(plane, g.height, g.width, s.y, s.x);
        }
    }
}
