// Device code shared by the deformable-convolution kernels (deform_sample.cu,
// deform_sample_backward.cu, deform_gather.cu).
//
// deformcp/backends/cuda_kernels.py pastes this file in place of the line
// that includes it in each .cu file before compiling that file, so
// that NVRTC (and CuPy's kernel cache, which hashes only the source string it
// is given) sees one self-contained source.  The semantics are those of
// docs/semantics.md; deformcp/backends/numpy_backend.py is the oracle.
//
// Conventions
//   scalar_t   storage type of the inputs and of the column matrices: __half,
//              __nv_bfloat16, float, double (the products run in the input's type,
//              on tensor cores for the half types, accumulating in float32)
//   acc_t      arithmetic type: float for the two half types, scalar_t otherwise
//   index_t    int (32-bit) unless an element count needs long long (64-bit)
//   VEC        channels a thread loads and stores at once (1, or a 16-byte vector)
//
// The input is read channels-last (NHWC), so the channels of one pixel are contiguous and
// a thread loads VEC of them at once (8 half values, 4 float, 2 double; VEC = 1 where the
// channel counts or the alignment do not allow it).  The work is enumerated by *samples*:
// (image of the tile, output pixel of the tile, offset group, kernel point), kernel point
// fastest.  In the sampling kernels a block takes `per_round` consecutive samples at a
// time; one thread per sample computes its geometry (position, mask, the four corners and
// their weights) once into shared memory, and `lanes` threads per sample then share it over
// the offset group's channels, lane l taking channel vectors l, l + lanes, ...  (DCNv4's
// pattern: a thread handles several channels of a group with vector loads.)
#ifndef DEFORMCP_DEFORM_COMMON_CUH
#define DEFORMCP_DEFORM_COMMON_CUH

#include <cuda_fp16.h>
#include <cuda_bf16.h>

// Every cooperative kernel runs 256 threads a block (dcn::kBlockThreads) and asks ptxas for
// registers enough to keep 3 blocks on a multiprocessor (at most 85 a thread); every instance
// fits without spilling (tests/test_kernels_nvrtc.py reads ptxas's report).
#define DCN_LAUNCH_BOUNDS __launch_bounds__(256, 3)

#ifndef DCN_SHARED
// A block's shared variable; the CPU emulation defines its own (one buffer per block).
#define DCN_SHARED(type, name) __shared__ type name
#endif

// The geometry and column layout every cooperative kernel receives, as scalar
// arguments in this order (cupy_backend._Launch.sampling_args builds them).  A tile
// covers images [batch_start, batch_start + tile_batch) and output rows
// [row_start, row_start + tile_rows).  Column element (image of the tile, tile pixel p,
// input channel c, kernel point k) is at
//   image * col_image_stride + p * col_pixel_stride + (c / group_channels) * col_group_stride
//   + k * col_point_stride + (c % group_channels) * col_channel_stride,
// group_channels being the channels of a convolution group: the products' layout
// (pixel-major rows, kernel-point-major within a group) and unfold's (c*K + k, p) are
// both of this form.
#define DCN_SAMPLING_PARAMS(index_t)                                                             \
    index_t channels, index_t height, index_t width, index_t kernel_h, index_t kernel_w,          \
    index_t stride_h, index_t stride_w, index_t pad_top, index_t pad_left, index_t dilation_h,   \
    index_t dilation_w, index_t offset_groups, index_t out_h, index_t out_w, index_t batch_start, \
    index_t tile_batch, index_t row_start, index_t tile_rows, index_t group_channels,             \
    index_t col_image_stride, index_t col_pixel_stride, index_t col_group_stride,                \
    index_t col_point_stride, index_t col_channel_stride

#define DCN_SAMPLING(index_t)                                                                       \
    dcn::Sampling<index_t>{channels, height, width, kernel_h, kernel_w, stride_h, stride_w,         \
                           pad_top, pad_left, dilation_h, dilation_w, offset_groups, out_h, out_w,  \
                           batch_start, tile_batch, row_start, tile_rows, group_channels,          \
                           col_image_stride, col_pixel_stride, col_group_stride, col_point_stride, \
                           col_channel_stride}

// Grid-stride loop over [0, n); the launcher guarantees that i + stride cannot
// overflow index_t (it picks the 64-bit instance otherwise).
#define DCN_GRID_STRIDE_LOOP(index_t, i, n)                                                       \
    for (index_t i = index_t(blockIdx.x) * index_t(blockDim.x) + index_t(threadIdx.x); i < (n); \
         i += index_t(blockDim.x) * index_t(gridDim.x))

namespace dcn {

template <typename T> struct Accumulate { using type = T; };
template <> struct Accumulate<__half> { using type = float; };
template <> struct Accumulate<__nv_bfloat16> { using type = float; };
template <typename T> using acc_t = typename Accumulate<T>::type;

__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }

// Round to nearest even, the same rounding NumPy's and ml_dtypes' astype use.
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }

// grad_x is a scatter, so it is accumulated with atomics; for the half types the
// accumulator is a float32 buffer (cast once afterwards), which also avoids the
// slow and lossy 16-bit atomics.  Hence one overload per accumulator type.
template <typename scalar_t>
__device__ __forceinline__ void atomic_accumulate(acc_t<scalar_t>* address, acc_t<scalar_t> value) {
    atomicAdd(address, value);
}



constexpr int kBlockThreads = 256;  // DCN_LAUNCH_BOUNDS says the same

// VEC consecutive values, loaded and stored as one aligned access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
    T v[VEC];
};

template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
    return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename index_t>
struct Sampling {
    index_t channels, height, width, kernel_h, kernel_w;
    index_t stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w;
    index_t offset_groups, out_h, out_w;
    index_t batch_start, tile_batch, row_start, tile_rows, group_channels;
    index_t col_image_stride, col_pixel_stride, col_group_stride, col_point_stride, col_channel_stride;

    __device__ __forceinline__ index_t kernel_points() const { return kernel_h * kernel_w; }
    __device__ __forceinline__ index_t out_pixels() const { return out_h * out_w; }
    __device__ __forceinline__ index_t tile_pixels() const { return tile_rows * out_w; }
    __device__ __forceinline__ index_t channels_per_offset_group() const { return channels / offset_groups; }
    __device__ __forceinline__ index_t samples() const {
        return tile_batch * tile_pixels() * offset_groups * kernel_points();
    }
    // Column index of channel c, relative to the sample's column_at (its channel 0).
    __device__ __forceinline__ index_t column_channel(index_t c) const {
        return (c / group_channels) * col_group_stride + (c % group_channels) * col_channel_stride;
    }
    // Index of (image b, pixel, channel 0) in the NHWC input.
    __device__ __forceinline__ index_t input_at(index_t b, index_t pixel) const {
        return (b * height * width + pixel) * channels;
    }
};
// One sample: where kernel point k of output pixel (oy, ox) of image b reads,
// in offset group `group`, and the mask value there.
template <typename scalar_t, typename index_t>
struct Sample {
    acc_t<scalar_t> y, x, mask;
    index_t offset_at;  // index of dy in `offset` (dx is one output plane further)
    index_t mask_at;    // index of the mask value in `mask`

    __device__ __forceinline__ Sample(const Sampling<index_t>& g, const scalar_t* offset,
                                      const scalar_t* mask_ptr, bool has_mask, index_t b,
                                      index_t group, index_t k, index_t oy, index_t ox) {
        const index_t points = g.kernel_points();
        const index_t plane = g.out_pixels();
        const index_t pixel = oy * g.out_w + ox;
        offset_at = ((b * g.offset_groups + group) * 2 * points + 2 * k) * plane + pixel;
        mask_at = ((b * g.offset_groups + group) * points + k) * plane + pixel;
        const index_t i = k / g.kernel_w;
        const index_t j = k - i * g.kernel_w;
        // The integer base position is exact in acc_t, so this is the CPU's sum.
        y = acc_t<scalar_t>(oy * g.stride_h - g.pad_top + i * g.dilation_h) + load(offset + offset_at);
        x = acc_t<scalar_t>(ox * g.stride_w - g.pad_left + j * g.dilation_w) + load(offset + offset_at + plane);
        mask = has_mask ? load(mask_ptr + mask_at) : acc_t<scalar_t>(1);
    }
};

// The early exit of bilinear interpolation: nothing is read outside (-1, H) x (-1, W).
// Comparisons with NaN are false, so a NaN position is never "outside".
template <typename acc, typename index_t>
__device__ __forceinline__ bool outside(acc y, acc x, index_t height, index_t width) {
    return y <= acc(-1) || y >= acc(height) || x <= acc(-1) || x >= acc(width);
}

// Integer top-left corner of the cell holding a position: clamped to
// [-2, size] (NaN to -2) so that any position, even NaN or infinite, converts
// safely; a clamped corner lies outside the image and reads nothing.
template <typename acc, typename index_t>
__device__ __forceinline__ index_t clamped_corner(acc floor_value, index_t size) {
    if (!(floor_value >= acc(-2))) return index_t(-2);
    if (floor_value > acc(size)) return size;
    return index_t(floor_value);
}

// The four pixels around a position, in the order (y0, x0), (y0, x0+1),
// (y0+1, x0), (y0+1, x0+1), with their bilinear weights.  Corners outside the
// image are flagged and never read or written.
template <typename acc, typename index_t>
struct Cell {
    acc ly, lx;          // y - floor(y), x - floor(x); NaN for a NaN or infinite position
    index_t index[4];    // row-major index of each corner in its channel plane
    bool inside[4];

    __device__ __forceinline__ Cell(acc y, acc x, index_t height, index_t width) {
        const acc y0 = floor(y), x0 = floor(x);
        ly = y - y0;
        lx = x - x0;
        const index_t yi = clamped_corner(y0, height), xi = clamped_corner(x0, width);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const index_t yy = yi + (q >> 1), xx = xi + (q & 1);
            inside[q] = yy >= 0 && yy < height && xx >= 0 && xx < width;
            index[q] = yy * width + xx;
        }
    }

    __device__ __forceinline__ acc weight(int q) const {
        return ((q & 2) ? ly : acc(1) - ly) * ((q & 1) ? lx : acc(1) - lx);
    }

    // Whether corner q lies within distance 1 of the position in both directions, the
    // corners torchvision's input gradient visits: not the far side of an integer
    // coordinate, whose weight is 0 but would still carry 0 * Inf = NaN.
    __device__ __forceinline__ bool near(int q) const {
        return ((q & 2) ? ly : acc(1) - ly) > acc(0) && ((q & 1) ? lx : acc(1) - lx) > acc(0);
    }
};

// The position of one sample in the tile: sample index s = ((image*P + p)*G + group)*K + k.
template <typename index_t>
struct SampleIndex {
    index_t image, p, group, k;

    __device__ __forceinline__ SampleIndex(const Sampling<index_t>& g, index_t s) {
        const index_t points = g.kernel_points();
        k = s % points;
        s /= points;
        group = s % g.offset_groups;
        s /= g.offset_groups;
        p = s % g.tile_pixels();
        image = s / g.tile_pixels();
    }
};

enum SampleState : int { kSampled = 0, kEarlyExit = 1, kNaNPosition = 2 };

// Everything about one sample that does not depend on the channel, computed once (by
// describe_sample) and shared by the threads that handle its channels.  A plain
// aggregate, so that it can live in shared memory.
template <typename acc, typename index_t>
struct SampleGeometry {
    acc weight[4];       // bilinear weight of each corner (Cell::weight)
    acc ly, lx;          // fractional position; ly + lx is NaN at a NaN position
    acc mask;
    index_t corner[4];   // pixel index y*W + x of each corner inside the image, -1 outside
    index_t input_at;    // NHWC index of the image's pixel 0, channel 0
    index_t column_at;   // column index of (image, p, channel 0, k)
    index_t offset_at;   // index of dy in `offset` (dx is one output plane further)
    index_t mask_at;     // index of the mask value
    index_t first_channel;  // the offset group's first input channel
    int state;           // SampleState
    int near_bits;       // bit q: corner q is within distance 1 of the position (Cell::near)
};

template <typename scalar_t, typename index_t>
__device__ __forceinline__ void describe_sample(SampleGeometry<acc_t<scalar_t>, index_t>& out,
                                                const Sampling<index_t>& g, const scalar_t* offset,
                                                const scalar_t* mask, bool has_mask, index_t s) {
    using acc = acc_t<scalar_t>;
    const SampleIndex<index_t> at(g, s);
    const index_t b = g.batch_start + at.image;
    const index_t oy = g.row_start + at.p / g.out_w, ox = at.p % g.out_w;
    const Sample<scalar_t, index_t> sample(g, offset, mask, has_mask, b, at.group, at.k, oy, ox);
    const Cell<acc, index_t> cell(sample.y, sample.x, g.height, g.width);
    out.ly = cell.ly;
    out.lx = cell.lx;
    out.mask = sample.mask;
    out.near_bits = 0;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        out.weight[q] = cell.weight(q);
        out.corner[q] = cell.inside[q] ? cell.index[q] : index_t(-1);
        if (cell.near(q)) out.near_bits |= 1 << q;
    }
    out.state = outside(sample.y, sample.x, g.height, g.width) ? kEarlyExit
              : (isnan(sample.y) || isnan(sample.x))         ? kNaNPosition
                                                              : kSampled;
    out.input_at = g.input_at(b, 0);
    out.column_at = at.image * g.col_image_stride + at.p * g.col_pixel_stride + at.k * g.col_point_stride;
    out.offset_at = sample.offset_at;
    out.mask_at = sample.mask_at;
    out.first_channel = at.group * g.channels_per_offset_group();
}

// Threads per sample: the smallest power of two covering the offset group's channel
// vectors, at most a block.
__device__ __forceinline__ int lanes_for(long long vectors) {
    int lanes = 1;
    while (lanes < kBlockThreads && lanes < vectors) lanes *= 2;
    return lanes;
}

}  // namespace dcn

#endif  // DEFORMCP_DEFORM_COMMON_CUH
