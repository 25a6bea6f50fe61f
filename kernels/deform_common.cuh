// Device helpers shared by the three deformable-convolution stages.
//
// deformcp/backends/cuda_kernels.py pastes this file in place of the line
// that includes it in each .cu file before compiling that file, so
// that NVRTC (and CuPy's kernel cache, which hashes only the source string it
// is given) sees one self-contained source.  The semantics are those of
// docs/semantics.md; deformcp/backends/numpy_backend.py is the oracle.
//
// Conventions
//   scalar_t   storage type of the inputs: __half, __nv_bfloat16, float, double
//   acc_t      arithmetic type: float for the two half types, scalar_t otherwise
//   index_t    int (32-bit) unless an element count needs long long (64-bit)
// The column matrix is always held in acc_t, so a half-precision result is
// rounded once, at the very end, as on the CPU.
#ifndef DEFORMCP_DEFORM_COMMON_CUH
#define DEFORMCP_DEFORM_COMMON_CUH

#include <cuda_fp16.h>
#include <cuda_bf16.h>

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

// The geometry every kernel receives, as individual scalar arguments in this
// order (cupy_backend._Launch.geometry_args builds them in the same order).  They are
// plain scalars rather than a struct so that CuPy passes each with its exact
// C type.  A tile covers images [batch_start, batch_start + tile_batch) and
// output rows [row_start, row_start + tile_rows); the column matrix of a tile
// holds element (image b, row r = c*K + k, tile pixel p) at
// b * col_batch_stride + r * col_row_stride + p.
#define DCN_GEOMETRY_PARAMS(index_t)                                                        \
    index_t channels, index_t height, index_t width, index_t kernel_h, index_t kernel_w,    \
    index_t stride_h, index_t stride_w, index_t pad_top, index_t pad_left,                  \
    index_t dilation_h, index_t dilation_w, index_t offset_groups, index_t out_h,           \
    index_t out_w, index_t batch_start, index_t tile_batch, index_t row_start,              \
    index_t tile_rows, index_t col_batch_stride, index_t col_row_stride

#define DCN_GEOMETRY(index_t)                                                               \
    dcn::Geometry<index_t>{channels, height, width, kernel_h, kernel_w, stride_h, stride_w, \
                           pad_top, pad_left, dilation_h, dilation_w, offset_groups, out_h, \
                           out_w, batch_start, tile_batch, row_start, tile_rows,            \
                           col_batch_stride, col_row_stride}

template <typename index_t>
struct Geometry {
    index_t channels, height, width, kernel_h, kernel_w;
    index_t stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w;
    index_t offset_groups, out_h, out_w;
    index_t batch_start, tile_batch, row_start, tile_rows;
    index_t col_batch_stride, col_row_stride;

    __device__ __forceinline__ index_t kernel_points() const { return kernel_h * kernel_w; }
    __device__ __forceinline__ index_t out_pixels() const { return out_h * out_w; }
    __device__ __forceinline__ index_t tile_pixels() const { return tile_rows * out_w; }
    __device__ __forceinline__ index_t channels_per_offset_group() const { return channels / offset_groups; }
    // Index of column-matrix element (image of the tile, row c*K + k, tile pixel).
    __device__ __forceinline__ index_t column_at(index_t image, index_t row, index_t pixel) const {
        return image * col_batch_stride + row * col_row_stride + pixel;
    }
};

// Where work item `idx` of a tile is, the items being enumerated as
// (image, outer, k, tile pixel): `outer` runs over `outer_count` channels or
// offset groups, k over `points` kernel points (1 for a thread that does them all).
template <typename index_t>
struct TileItem {
    index_t image, b, outer, k, p, oy, ox;

    __device__ __forceinline__ TileItem(const Geometry<index_t>& g, index_t idx, index_t outer_count,
                                        index_t points) {
        const index_t pixels = g.tile_pixels();
        p = idx % pixels;
        idx /= pixels;
        k = idx % points;
        idx /= points;
        outer = idx % outer_count;
        image = idx / outer_count;
        b = g.batch_start + image;
        oy = g.row_start + p / g.out_w;
        ox = p % g.out_w;
    }
};

// Grid-stride loop over [0, n); the launcher guarantees that i + stride cannot
// overflow index_t (it picks the 64-bit instance otherwise).
#define DCN_GRID_STRIDE_LOOP(index_t, i, n)                                                       \
    for (index_t i = index_t(blockIdx.x) * index_t(blockDim.x) + index_t(threadIdx.x); i < (n); \
         i += index_t(blockDim.x) * index_t(gridDim.x))

// One sample: where kernel point k of output pixel (oy, ox) of image b reads,
// in offset group `group`, and the mask value there.
template <typename scalar_t, typename index_t>
struct Sample {
    acc_t<scalar_t> y, x, mask;
    index_t offset_at;  // index of dy in `offset` (dx is one output plane further)
    index_t mask_at;    // index of the mask value in `mask`

    __device__ __forceinline__ Sample(const Geometry<index_t>& g, const scalar_t* offset,
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

// Zero-padded bilinear sample of one channel plane, with the early exit: 0
// outside (-1, H) x (-1, W), NaN at a NaN position.  Every corner inside the
// image is weighted, including those of weight 0, so that a NaN or infinite
// pixel poisons every sample that reads it.
template <typename scalar_t, typename index_t>
__device__ __forceinline__ acc_t<scalar_t> bilinear(const scalar_t* plane, index_t height, index_t width,
                                                    acc_t<scalar_t> y, acc_t<scalar_t> x) {
    using acc = acc_t<scalar_t>;
    if (outside(y, x, height, width)) return acc(0);
    if (isnan(y) || isnan(x)) return y + x;  // NaN, without needing a NaN constant
    const Cell<acc, index_t> cell(y, x, height, width);
    acc value = 0;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        if (cell.inside[q]) value += cell.weight(q) * load(plane + cell.index[q]);
    }
    return value;
}

}  // namespace dcn

#endif  // DEFORMCP_DEFORM_COMMON_CUH
