// The deterministic gradient with respect to x: a gather in a fixed order instead of an
// atomic scatter.
//
// Stage "gather_keys": one thread per sample writes, for each of its four corners q,
// entry 4*s + q: the key of the input pixel the corner adds to, (image * G + group) * H*W
// + pixel, and the coefficient mask * weight_q; corners that add nothing (outside the
// image, farther than 1 from the position, or a sample that exits early or sits at a NaN
// position) get the key tile_batch * G * H*W, which sorts after every pixel.  The host
// sorts the entries by key with a stable sort (so each pixel's entries stay in sample
// order) and finds where each pixel's entries start.
//
// Stage "gather": one thread per (pixel, channel vector) adds, to the pixel's value in
// grad_input (NHWC, acc_t), coefficient * column gradient for each of its entries in
// sorted order, continuing from the value the earlier tiles left.  Tiles are processed in
// sample order, so every pixel's sum is formed in the same order, sample by sample,
// whatever the tiles, the launch or the scheduling: the result is bitwise reproducible.
#include "deform_common.cuh"

template <typename scalar_t, typename index_t>
__global__ void DCN_LAUNCH_BOUNDS
deform_gather_keys_kernel(const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask, index_t has_mask,
                          index_t* __restrict__ keys, dcn::acc_t<scalar_t>* __restrict__ coefficients,
                          DCN_SAMPLING_PARAMS(index_t)) {
    using acc = dcn::acc_t<scalar_t>;
    const dcn::Sampling<index_t> g = DCN_SAMPLING(index_t);
    const index_t n = g.samples();
    const index_t plane = g.height * g.width;
    const index_t none = g.tile_batch * g.offset_groups * plane;
    DCN_GRID_STRIDE_LOOP(index_t, s, n) {
        dcn::SampleGeometry<acc, index_t> sample;
        dcn::describe_sample(sample, g, offset, mask, has_mask != 0, s);
        const dcn::SampleIndex<index_t> at(g, s);
        const index_t target = (at.image * g.offset_groups + at.group) * plane;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const bool adds = sample.state == dcn::kSampled && sample.corner[q] >= 0 && (sample.near_bits & (1 << q));
            keys[4 * s + q] = adds ? target + sample.corner[q] : none;
            coefficients[4 * s + q] = adds ? sample.mask * sample.weight[q] : acc(0);
        }
    }
}

template <typename scalar_t, typename index_t, int VEC>
__global__ void DCN_LAUNCH_BOUNDS
deform_gather_kernel(index_t n, const long long* __restrict__ starts, const long long* __restrict__ order,
                     const dcn::acc_t<scalar_t>* __restrict__ coefficients,
                     const scalar_t* __restrict__ grad_columns, dcn::acc_t<scalar_t>* __restrict__ grad_input,
                     DCN_SAMPLING_PARAMS(index_t)) {
    using acc = dcn::acc_t<scalar_t>;
    const dcn::Sampling<index_t> g = DCN_SAMPLING(index_t);
    const index_t vectors = g.channels_per_offset_group() / VEC;
    const index_t plane = g.height * g.width;
    DCN_GRID_STRIDE_LOOP(index_t, i, n) {
        const index_t target = i / vectors, vector = i % vectors;
        const index_t pixel = target % plane, group = target / plane % g.offset_groups;
        const index_t image = target / plane / g.offset_groups;
        const index_t c0 = group * g.channels_per_offset_group() + vector * VEC;
        acc* out = grad_input + g.input_at(g.batch_start + image, pixel) + c0;
        acc sum[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) sum[j] = out[j];
        for (long long e = starts[target]; e < starts[target + 1]; ++e) {
            const long long entry = order[e];
            const dcn::SampleIndex<index_t> at(g, index_t(entry / 4));
            const acc coefficient = coefficients[entry];
            const scalar_t* grad_at = grad_columns + at.image * g.col_image_stride + at.p * g.col_pixel_stride
                                    + at.k * g.col_point_stride + g.column_channel(c0);
            if (g.col_channel_stride == 1) {
                const dcn::Pack<scalar_t, VEC> packed = dcn::load_pack<VEC>(grad_at);
#pragma unroll
                for (int j = 0; j < VEC; ++j) sum[j] += coefficient * dcn::load(&packed.v[j]);
            } else {
#pragma unroll
                for (int j = 0; j < VEC; ++j) sum[j] += coefficient * dcn::load(grad_at + j * g.col_channel_stride);
            }
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] = sum[j];
    }
}
