// Forward sampling: the deformable im2col, mask applied, from a channels-last input.
//
// Column element (image, p, c, k) = mask * bilinear(x[b, :, :, c], py, px) for the
// sample (image, p, offset group of c, k), written where the column layout puts it
// (DCN_SAMPLING_PARAMS): pixel-major rows in the input's own type for the products,
// or unfold's (c*K + k, p) for deform_im2col.  Each sample's geometry is computed once,
// into shared memory, and shared by the `lanes` threads that sample its offset group's
// channels, VEC at a time (see deform_common.cuh).  With `ones_at >= 0` the thread of
// each (image, pixel)'s first sample also writes 1 at column offset ones_at of every
// convolution group: the bias's column, so that the product adds the bias itself.
#include "deform_common.cuh"

template <typename scalar_t, typename index_t, int VEC>
__global__ void DCN_LAUNCH_BOUNDS
deform_sample_kernel(const scalar_t* __restrict__ input, const scalar_t* __restrict__ offset,
                     const scalar_t* __restrict__ mask, index_t has_mask, scalar_t* __restrict__ columns,
                     index_t ones_at, DCN_SAMPLING_PARAMS(index_t)) {
    using acc = dcn::acc_t<scalar_t>;
    using GeometryBlock = dcn::SampleGeometry<acc, index_t>[dcn::kBlockThreads];
    DCN_SHARED(GeometryBlock, geometry);
    const dcn::Sampling<index_t> g = DCN_SAMPLING(index_t);
    const index_t vectors = g.channels_per_offset_group() / VEC;
    const int lanes = dcn::lanes_for(vectors);
    const int per_round = dcn::kBlockThreads / lanes;
    const int lane = int(threadIdx.x) % lanes, slot = int(threadIdx.x) / lanes;
    const index_t n = g.samples();
    // Every thread of the block runs the same rounds, so the barriers are uniform.
    for (index_t first = index_t(blockIdx.x) * per_round; first < n; first += index_t(gridDim.x) * per_round) {
        if (int(threadIdx.x) < per_round && first + index_t(threadIdx.x) < n) {
            dcn::describe_sample(geometry[threadIdx.x], g, offset, mask, has_mask != 0, first + index_t(threadIdx.x));
        }
        __syncthreads();
        if (first + slot < n) {
            const dcn::SampleGeometry<acc, index_t>& s = geometry[slot];
            for (index_t vector = lane; vector < vectors; vector += lanes) {
                const index_t c0 = s.first_channel + vector * VEC;
                acc value[VEC];
#pragma unroll
                for (int j = 0; j < VEC; ++j) value[j] = acc(0);
                if (s.state == dcn::kNaNPosition) {
#pragma unroll
                    for (int j = 0; j < VEC; ++j) value[j] = s.ly + s.lx;  // NaN
                } else if (s.state == dcn::kSampled) {
                    // The corners inside the image in order, weight times value: torchvision's sum.
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        if (s.corner[q] < 0) continue;
                        const dcn::Pack<scalar_t, VEC> v =
                            dcn::load_pack<VEC>(input + s.input_at + s.corner[q] * g.channels + c0);
#pragma unroll
                        for (int j = 0; j < VEC; ++j) value[j] += s.weight[q] * dcn::load(&v.v[j]);
                    }
                }
                // A NaN mask poisons even an outside sample (mask * 0), as in torchvision.
                scalar_t* out = columns + s.column_at + g.column_channel(c0);
                if (g.col_channel_stride == 1) {
                    dcn::Pack<scalar_t, VEC> packed;
#pragma unroll
                    for (int j = 0; j < VEC; ++j) dcn::store(&packed.v[j], s.mask * value[j]);
                    *reinterpret_cast<dcn::Pack<scalar_t, VEC>*>(out) = packed;
                } else {
#pragma unroll
                    for (int j = 0; j < VEC; ++j) dcn::store(out + j * g.col_channel_stride, s.mask * value[j]);
                }
            }
            if (ones_at >= 0 && lane == 0 && (first + slot) % (g.offset_groups * g.kernel_points()) == 0) {
                // The sample's column_at is that of (image, p, k = 0): add each group's ones column.
                for (index_t c = 0; c < g.channels; c += g.group_channels) {
                    dcn::store(columns + s.column_at + g.column_channel(c) + ones_at, acc(1));
                }
            }
        }
        __syncthreads();
    }
}
