// matmul.hip: fused dequantize-and-multiply, y = x · Wᵀ, with W stored row by row in a GGML
// format (one row per output feature). Two shapes:
//   matvec_<type>: one token (decode). One warp per output row; the lanes walk the row 8
//                  values at a time and meet in a warp reduction.
//   matmul_<type>: many tokens (prefill). 64x64 output tiles, 32-deep K slices; the weight
//                  slice is decoded once into shared memory and used by all 64 tokens.
// Both take an optional `add` (same shape as y, may alias y) so a residual add costs nothing.
#include "quant.h"

template <int T>
__device__ __forceinline__ float row_dot(const u8* row, const float* x, int K, int lane) {
    float acc = 0.0f;
    for (int k = lane * 8; k < K; k += RF_WARP * 8) {
        float w[8];
        dequant8<T>(row, k, w);
        const float4 x0 = *(const float4*)(x + k), x1 = *(const float4*)(x + k + 4);
        acc += w[0] * x0.x + w[1] * x0.y + w[2] * x0.z + w[3] * x0.w
             + w[4] * x1.x + w[5] * x1.y + w[6] * x1.z + w[7] * x1.w;
    }
    return warp_sum(acc);
}

template <int T>
__device__ void matvec(const u8* W, long row_bytes, const float* x, float* y, int N, int K, const float* add) {
    const int lane = threadIdx.x % RF_WARP;
    const int n = blockIdx.x * (blockDim.x / RF_WARP) + threadIdx.x / RF_WARP;
    if (n >= N) return;
    const float dot = row_dot<T>(W + n * row_bytes, x, K, lane);
    if (lane == 0) y[n] = dot + (add ? add[n] : 0.0f);
}

#define TILE_M 64
#define TILE_N 64
#define TILE_K 32

// 256 threads; each computes a 4x4 patch of the 64x64 tile. Needs K % 32 == 0.
template <int T>
__device__ void matmul(const u8* W, long row_bytes, const float* X, float* Y, int M, int N, int K, const float* add) {
    __shared__ float xs[TILE_K][TILE_M + 4];  // transposed: xs[k][m]
    __shared__ float ws[TILE_K][TILE_N + 4];  // transposed: ws[k][n]
    const int tid = threadIdx.x;
    const int m0 = blockIdx.y * TILE_M, n0 = blockIdx.x * TILE_N;
    const int load_r = tid / 4, load_k = (tid % 4) * 8;  // each thread loads 8 values of one row
    const int tm = (tid / 16) * 4, tn = (tid % 16) * 4;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += TILE_K) {
        float v[8];
        const int m = m0 + load_r;
        if (m < M) {
            const float4 a = *(const float4*)(X + (long)m * K + k0 + load_k);
            const float4 b = *(const float4*)(X + (long)m * K + k0 + load_k + 4);
            v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
        } else {
            for (int i = 0; i < 8; i++) v[i] = 0.0f;
        }
        for (int i = 0; i < 8; i++) xs[load_k + i][load_r] = v[i];
        const int n = n0 + load_r;
        if (n < N) dequant8<T>(W + n * row_bytes, k0 + load_k, v);
        else for (int i = 0; i < 8; i++) v[i] = 0.0f;
        for (int i = 0; i < 8; i++) ws[load_k + i][load_r] = v[i];
        __syncthreads();
        #pragma unroll 8
        for (int k = 0; k < TILE_K; k++) {
            const float4 a = *(const float4*)&xs[k][tm];
            const float4 b = *(const float4*)&ws[k][tn];
            const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
            #pragma unroll
            for (int i = 0; i < 4; i++)
                #pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += av[i] * bv[j];
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; i++) {
        const int m = m0 + tm + i;
        if (m >= M) continue;
        for (int j = 0; j < 4; j++) {
            const int n = n0 + tn + j;
            if (n >= N) continue;
            const long o = (long)m * N + n;
            Y[o] = acc[i][j] + (add ? add[o] : 0.0f);
        }
    }
}

#define RF_MATMUL_KERNELS(name, T)                                                                         \
    extern "C" __global__ void matvec_##name(const u8* W, long row_bytes, const float* x, float* y, int N,  \
                                             int K, const float* add) {                                    \
        matvec<T>(W, row_bytes, x, y, N, K, add);                                                          \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(256) matmul_##name(const u8* W, long row_bytes,           \
                                             const float* X, float* Y, int M, int N, int K, const float* add) { \
        matmul<T>(W, row_bytes, X, Y, M, N, K, add);                                                       \
    }
RF_FOR_EACH_TYPE(RF_MATMUL_KERNELS)
