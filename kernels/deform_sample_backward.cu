// Backward sampling: the gradients with respect to offset and mask, reduced over the
// channels cooperatively, and (unless deterministic) the gradient with respect to x by
// atomic scatter, from one read of the column gradient.
//
// For each sample, with v_q the value of corner q in channel c (0 outside the image) and
// g_c its column gradient,
//   d/dy    = sum_c (mask * ((1 - lx) (v2 - v0) + lx (v3 - v1))) * g_c
//   d/dx    = sum_c (mask * ((1 - ly) (v1 - v0) + ly (v3 - v2))) * g_c
//   d/dmask = sum_c g_c * value_c,   value_c = sum_q weight_q v_q, 0 for a sample that exits early
// each product grouped as torchvision groups it, so that NaN and Inf in the column
// gradient, the mask or the input land where they land there.  The coordinate derivative
// has no early exit (corners inside the image count on the lines y = -1 and x = -1).
// The `lanes` threads of a sample each sum their channel vectors in order, then the lanes'
// partial sums are added in a fixed tree in shared memory (the same order every run);
// lane 0 writes the three results, each exactly once.
//
// With want_input, each thread also adds (mask * weight_q) * g_c to each in-image corner
// within distance 1 of the position (Cell::near) of grad_input, the whole gradient in NHWC
// and in acc_t, by atomics (so its rounding may vary between runs; deform_gather.cu is the
// deterministic alternative).  Samples that exit early or sit at a NaN position scatter
// nothing.
#include "deform_common.cuh"

template <typename scalar_t, typename index_t, int VEC>
__global__ void DCN_LAUNCH_BOUNDS
deform_sample_backward_kernel(const scalar_t* __restrict__ grad_columns, const scalar_t* __restrict__ input,
                              const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask,
                              index_t has_mask, dcn::acc_t<scalar_t>* __restrict__ grad_input, index_t want_input,
                              scalar_t* __restrict__ grad_offset, index_t want_offset,
                              scalar_t* __restrict__ grad_mask, index_t want_mask, DCN_SAMPLING_PARAMS(index_t)) {
    using acc = dcn::acc_t<scalar_t>;
    using GeometryBlock = dcn::SampleGeometry<acc, index_t>[dcn::kBlockThreads];
    using Partials = acc[3][dcn::kBlockThreads];
    DCN_SHARED(GeometryBlock, geometry);
    DCN_SHARED(Partials, partial);
    const dcn::Sampling<index_t> g = DCN_SAMPLING(index_t);
    const index_t vectors = g.channels_per_offset_group() / VEC;
    const int lanes = dcn::lanes_for(vectors);
    const int per_round = dcn::kBlockThreads / lanes;
    const int t = int(threadIdx.x), lane = t % lanes, slot = t / lanes;
    const bool want_coordinates = want_offset != 0 || want_mask != 0;
    const index_t n = g.samples();
    for (index_t first = index_t(blockIdx.x) * per_round; first < n; first += index_t(gridDim.x) * per_round) {
        if (t < per_round && first + t < n) {
            dcn::describe_sample(geometry[t], g, offset, mask, has_mask != 0, first + t);
        }
        __syncthreads();
        acc d_y = 0, d_x = 0, d_mask = 0;
        if (first + slot < n) {
            const dcn::SampleGeometry<acc, index_t>& s = geometry[slot];
            const bool scatter = want_input != 0 && s.state == dcn::kSampled;
            for (index_t vector = lane; vector < vectors; vector += lanes) {
                const index_t c0 = s.first_channel + vector * VEC;
                // Values stay packed in the storage type until used: fewer registers than
                // widening VEC channels of four corners at once.
                const scalar_t* grad_at = grad_columns + s.column_at + g.column_channel(c0);
                dcn::Pack<scalar_t, VEC> grad;
                if (g.col_channel_stride == 1) {
                    grad = dcn::load_pack<VEC>(grad_at);
                } else {
#pragma unroll
                    for (int j = 0; j < VEC; ++j) grad.v[j] = grad_at[j * g.col_channel_stride];
                }
                if (scatter) {
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        if (s.corner[q] < 0 || !(s.near_bits & (1 << q))) continue;
                        acc* target = grad_input + s.input_at + s.corner[q] * g.channels + c0;
                        const acc coefficient = s.mask * s.weight[q];
#pragma unroll
                        for (int j = 0; j < VEC; ++j) {
                            dcn::atomic_accumulate<scalar_t>(target + j, coefficient * dcn::load(&grad.v[j]));
                        }
                    }
                }
                if (!want_coordinates) continue;
                dcn::Pack<scalar_t, VEC> corner[4];
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    if (s.corner[q] >= 0) {
                        corner[q] = dcn::load_pack<VEC>(input + s.input_at + s.corner[q] * g.channels + c0);
                    } else {
#pragma unroll
                        for (int j = 0; j < VEC; ++j) dcn::store(&corner[q].v[j], acc(0));
                    }
                }
#pragma unroll
                for (int j = 0; j < VEC; ++j) {
                    const acc gj = dcn::load(&grad.v[j]);
                    const acc v0 = dcn::load(&corner[0].v[j]), v1 = dcn::load(&corner[1].v[j]);
                    const acc v2 = dcn::load(&corner[2].v[j]), v3 = dcn::load(&corner[3].v[j]);
                    d_y += (s.mask * (s.lx * (v3 - v1) + (acc(1) - s.lx) * (v2 - v0))) * gj;
                    d_x += (s.mask * (s.ly * (v3 - v2) + (acc(1) - s.ly) * (v1 - v0))) * gj;
                    // The sample's own value, early exit included: 0 outside, even when a
                    // corner it would touch (on a -1 line) holds NaN.
                    const acc value = s.state == dcn::kEarlyExit ? acc(0)
                        : s.weight[0] * v0 + s.weight[1] * v1 + s.weight[2] * v2 + s.weight[3] * v3;
                    d_mask += gj * value;
                }
            }
        }
        if (want_coordinates) {
            partial[0][t] = d_y;
            partial[1][t] = d_x;
            partial[2][t] = d_mask;
            __syncthreads();
            // A fixed tree over the sample's lanes: the same additions in the same order every run.
            for (int half = lanes / 2; half > 0; half /= 2) {
                if (lane < half) {
#pragma unroll
                    for (int r = 0; r < 3; ++r) partial[r][t] += partial[r][t + half];
                }
                __syncthreads();
            }
            if (lane == 0 && first + slot < n) {
                const dcn::SampleGeometry<acc, index_t>& s = geometry[slot];
                if (want_offset) {
                    dcn::store(grad_offset + s.offset_at, partial[0][t]);
                    dcn::store(grad_offset + s.offset_at + g.out_pixels(), partial[1][t]);
                }
                if (want_mask) dcn::store(grad_mask + s.mask_at, partial[2][t]);
            }
        }
        __syncthreads();
    }
}
