// matmul.hip: fused dequantize-and-multiply, y = x · Wᵀ, with W stored row by row in a GGML
// format (one row per output feature).
//   matvec_<type>: one token (decode). One warp per output row; the lanes walk the row 8
//                  values at a time and meet in a warp reduction. Up to three matrices with the same
//                  input go in one launch; an RMSNorm in front and a residual add behind can be fused.
//   matvec_glu_<type>: gate and up rows of the MLP together, with SiLU/GELU applied.
//   matmul_<type>, matmul_m32_<type>: many tokens (prefill). 64 (or 32) tokens x 64 outputs per tile,
//                  32-deep K slices; the weight slice is decoded once into shared memory and used by
//                  all the tile's tokens. A residual
//                  add can be fused behind it: sum = Y + add.
#include "quant.h"

// x_k as the matvec sees it: the raw input, or rms_norm(x) * norm_w when a norm is fused in front.
__device__ __forceinline__ float4 load_x4(const float* x, const float* norm_w, float scale, int k) {
    float4 v = *(const float4*)(x + k);
    if (norm_w) {
        const float4 w = *(const float4*)(norm_w + k);
        v.x *= scale * w.x; v.y *= scale * w.y; v.z *= scale * w.z; v.w *= scale * w.w;  // as x_out below
    }
    return v;
}

// The lanes walk the row 256 values (32 lanes x 8) at a time; all lanes run every step because the
// activation rounding shuffles across them.
template <int T>
__device__ __forceinline__ float row_dot(const u8* row, const float* x, const float* norm_w, float scale, int K,
                                         int lane, int act) {
    float acc = 0.0f;
    #pragma unroll 4  // rows are a few hundred to a few thousand long: issue their loads together
    for (int base = 0; base < K; base += RF_WARP * 8) {
        const int k = base + lane * 8;
        float xv[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        if (k < K) {
            const float4 x0 = load_x4(x, norm_w, scale, k), x1 = load_x4(x, norm_w, scale, k + 4);
            xv[0] = x0.x; xv[1] = x0.y; xv[2] = x0.z; xv[3] = x0.w; xv[4] = x1.x; xv[5] = x1.y; xv[6] = x1.z; xv[7] = x1.w;
        }
        round_activations8(xv, act);
        if (k < K) {
            float w[8];
            dequant8<T>(row, k, w);
            for (int i = 0; i < 8; i++) acc += w[i] * xv[i];
        }
    }
    return warp_sum(acc);
}

// Start the row's bytes on their way from memory before the warp spends time on the input row.
__device__ __forceinline__ void prefetch_row(const u8* row, long row_bytes, int lane) {
    for (long o = lane * 128L; o < row_bytes; o += RF_WARP * 128L) prefetch_l2(row + o);
}

// The RMSNorm scale 1/sqrt(mean(x²) + eps) of the input row, computed by every warp on its own (x is
// short: one token), and the normalized row written once by block 0 for whoever reads it later.
__device__ __forceinline__ float fused_norm(const float* x, const float* norm_w, float eps, float* x_out, int K) {
    if (!norm_w) return 1.0f;
    float ss = 0.0f;
    #pragma unroll 8
    for (int k = threadIdx.x % RF_WARP; k < K; k += RF_WARP) ss += x[k] * x[k];
    const float scale = rsqrtf(warp_sum(ss) / (float)K + eps);
    if (blockIdx.x == 0 && x_out)
        for (int k = threadIdx.x; k < K; k += blockDim.x) x_out[k] = x[k] * (scale * norm_w[k]);
    return scale;
}

// Rotary embedding and KV-cache store folded behind the q/k/v matvec of a decode step (normal, non-NeoX
// rope over whole heads, so the pair (2i, 2i+1) of a head are two rows of the same block). rot[j] non-null:
// rows of matrix j are rotated into rot[j]; k_pool non-null: the rotated rows of matrix 1 (keys) and the
// rows of matrix 2 (values) are also written to the cache at slots[0].
struct RopeEpilogue {
    const int* positions;
    const double* inv_freq;
    int head_dim;
    float* rot0;
    float* rot1;
    float* k_pool;
    float* v_pool;
    const int* slots;
};

// Decode: up to three matrices that share one input (q, k, v) in one launch, one warp per output row,
// rows numbered across the matrices. An optional RMSNorm is fused in front (norm_w non-null), for a single
// matrix an optional residual add behind it (sum = y + add), and for q/k/v the rope epilogue above.
template <int T>
__device__ void matvec(const float* x, int K, int act, const float* norm_w, float eps, float* x_out,
                       const u8* W0, long rb0, float* y0, int N0, const u8* W1, long rb1, float* y1, int N1,
                       const u8* W2, long rb2, float* y2, int N2, const float* add, float* sum, RopeEpilogue rope) {
    __shared__ float dots[RF_MAX_WARPS];
    const int lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP;
    int n = blockIdx.x * (blockDim.x / RF_WARP) + warp, matrix = 0;
    const u8* W = W0; long rb = rb0; float* y = y0;
    if (n >= N0) {
        n -= N0; W = W1; rb = rb1; y = y1; matrix = 1;
        if (n >= N1) { n -= N1; W = W2; rb = rb2; y = y2; matrix = 2; }
    }
    const bool valid = matrix < 2 || n < N2;
    if (valid) prefetch_row(W + n * rb, rb, lane);
    const float scale = fused_norm(x, norm_w, eps, x_out, K);
    const float dot = valid ? row_dot<T>(W + n * rb, x, norm_w, scale, K, lane, act) : 0.0f;
    if (valid && lane == 0) {
        y[n] = dot;
        if (sum) sum[n] = dot + add[n];
    }
    if (!rope.positions) return;  // uniform: every warp of the block takes the same branch
    if (lane == 0) dots[warp] = dot;
    __syncthreads();
    if (!valid || lane != 0) return;
    float* rot = matrix == 0 ? rope.rot0 : matrix == 1 ? rope.rot1 : nullptr;
    if (rot) {
        const int i = (n % rope.head_dim) / 2;
        const double angle = (double)rope.positions[0] * rope.inv_freq[i];
        float sn, cs;
        sincosf((float)(angle - 6.283185307179586 * rint(angle * 0.15915494309189535)), &sn, &cs);
        const float x0 = dots[warp & ~1], x1 = dots[warp | 1];
        const float r = (n & 1) ? x0 * sn + x1 * cs : x0 * cs - x1 * sn;
        rot[n] = r;
        if (matrix == 1 && rope.k_pool) rope.k_pool[(long)rope.slots[0] * N1 + n] = r;
    } else if (matrix == 2 && rope.v_pool) {
        rope.v_pool[(long)rope.slots[0] * N2 + n] = dot;
    }
}

// Decode MLP gate in one pass: g = Wg·x, u = Wu·x, y = act(g) * u; act 0 = SiLU, 1 = GELU (tanh form).
template <int T>
__device__ void matvec_glu(const float* x, int K, int act_round, const float* norm_w, float eps, float* x_out, const u8* Wg,
                           const u8* Wu, long rb, float* g, float* u, float* y, int N, int act) {
    const int lane = threadIdx.x % RF_WARP;
    const int n = blockIdx.x * (blockDim.x / RF_WARP) + threadIdx.x / RF_WARP;
    if (n < N) {
        prefetch_row(Wg + n * rb, rb, lane);
        prefetch_row(Wu + n * rb, rb, lane);
    }
    const float scale = fused_norm(x, norm_w, eps, x_out, K);
    if (n >= N) return;
    const float gn = row_dot<T>(Wg + n * rb, x, norm_w, scale, K, lane, act_round);
    const float un = row_dot<T>(Wu + n * rb, x, norm_w, scale, K, lane, act_round);
    if (lane == 0) {
        const float a = act == 0 ? gn / (1.0f + expf(-gn))
                                 : 0.5f * gn * (1.0f + tanhf(0.7978845608028654f * (gn + 0.044715f * gn * gn * gn)));
        g[n] = gn;
        u[n] = un;
        y[n] = a * un;
    }
}

#define TILE_N 64
#define TILE_K 32

// 256 threads compute a TM x 64 tile (TM = 64 or 32 tokens), each thread a (TM/16) x 4 patch; smaller
// TM gives more blocks when there are few output tiles. Needs K % 32 == 0.
template <int T, int TM>
__device__ void matmul(const u8* W, long row_bytes, const float* X, float* Y, int M, int N, int K, const float* add,
                       float* sum) {
    constexpr int RM = TM / 16, XV = TM / 8;  // rows per thread; X values each thread loads per K slice
    __shared__ float xs[TILE_K][TM + 4];      // transposed: xs[k][m]
    __shared__ float ws[TILE_K][TILE_N + 4];  // transposed: ws[k][n]
    const int tid = threadIdx.x;
    const int m0 = blockIdx.y * TM, n0 = blockIdx.x * TILE_N;
    const int x_r = tid / (TILE_K / XV), x_k = (tid % (TILE_K / XV)) * XV;
    const int w_r = tid / 4, w_k = (tid % 4) * 8;  // each thread decodes 8 values of one weight row
    const int tm = (tid / 16) * RM, tn = (tid % 16) * 4;
    float acc[RM][4] = {};
    for (int k0 = 0; k0 < K; k0 += TILE_K) {
        const int m = m0 + x_r;
        #pragma unroll
        for (int i = 0; i < XV; i += 4) {
            float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (m < M) a = *(const float4*)(X + (long)m * K + k0 + x_k + i);
            xs[x_k + i][x_r] = a.x; xs[x_k + i + 1][x_r] = a.y; xs[x_k + i + 2][x_r] = a.z; xs[x_k + i + 3][x_r] = a.w;
        }
        float v[8];
        const int n = n0 + w_r;
        if (n < N) dequant8<T>(W + n * row_bytes, k0 + w_k, v);
        else for (int i = 0; i < 8; i++) v[i] = 0.0f;
        for (int i = 0; i < 8; i++) ws[w_k + i][w_r] = v[i];
        __syncthreads();
        #pragma unroll 8
        for (int k = 0; k < TILE_K; k++) {
            float av[RM];
            #pragma unroll
            for (int i = 0; i < RM; i++) av[i] = xs[k][tm + i];
            const float4 b = *(const float4*)&ws[k][tn];
            const float bv[4] = {b.x, b.y, b.z, b.w};
            #pragma unroll
            for (int i = 0; i < RM; i++)
                #pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += av[i] * bv[j];
        }
        __syncthreads();
    }
    for (int i = 0; i < RM; i++) {
        const int m = m0 + tm + i;
        if (m >= M) continue;
        for (int j = 0; j < 4; j++) {
            const int n = n0 + tn + j;
            if (n >= N) continue;
            const long o = (long)m * N + n;
            Y[o] = acc[i][j];
            if (sum) sum[o] = acc[i][j] + add[o];
        }
    }
}

#define RF_MATMUL_KERNELS(name, T)                                                                           \
    extern "C" __global__ void matvec_##name(const float* x, int K, int act, const float* norm_w, float eps, float* x_out, \
                                             const u8* W0, long rb0, float* y0, int N0, const u8* W1, long rb1,   \
                                             float* y1, int N1, const u8* W2, long rb2, float* y2, int N2,         \
                                             const float* add, float* sum, const int* positions,                  \
                                             const double* inv_freq, int head_dim, float* rot0, float* rot1,      \
                                             float* k_pool, float* v_pool, const int* slots) {                    \
        const RopeEpilogue rope = {positions, inv_freq, head_dim, rot0, rot1, k_pool, v_pool, slots};           \
        matvec<T>(x, K, act, norm_w, eps, x_out, W0, rb0, y0, N0, W1, rb1, y1, N1, W2, rb2, y2, N2, add, sum, rope); \
    }                                                                                                            \
    extern "C" __global__ void matvec_glu_##name(const float* x, int K, int act_round, const float* norm_w, float eps, \
                                                 float* x_out, const u8* Wg, const u8* Wu, long rb, float* g,     \
                                                 float* u, float* y, int N, int act) {                            \
        matvec_glu<T>(x, K, act_round, norm_w, eps, x_out, Wg, Wu, rb, g, u, y, N, act);                                    \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) matmul_##name(const u8* W, long row_bytes, const float* X, \
                                                                    float* Y, int M, int N, int K, const float* add, \
                                                                    float* sum) {                                \
        matmul<T, 64>(W, row_bytes, X, Y, M, N, K, add, sum);                                                    \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) matmul_m32_##name(const u8* W, long row_bytes,             \
                                                                        const float* X, float* Y, int M, int N,  \
                                                                        int K, const float* add, float* sum) {   \
        matmul<T, 32>(W, row_bytes, X, Y, M, N, K, add, sum);                                                    \
    }
RF_FOR_EACH_TYPE(RF_MATMUL_KERNELS)

// Prefill: round the activations (n values, rows of a multiple of 256) the way llama.cpp does for the weight
// type (see quant.h) before the tiled matmul reads them. Each lane rounds 8 consecutive values, a warp 256
// per step, exactly as the matvecs do; the loop is uniform across a warp because the rounding shuffles.
extern "C" __global__ void round_activations(const float* x, float* y, long n, int act) {
    const long lane = threadIdx.x % RF_WARP;
    const long warps = (long)gridDim.x * (blockDim.x / RF_WARP);
    for (long base = (blockIdx.x * (long)(blockDim.x / RF_WARP) + threadIdx.x / RF_WARP) * RF_WARP * 8; base < n;
         base += warps * RF_WARP * 8) {
        const long k = base + lane * 8;
        float v[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        if (k < n) for (int i = 0; i < 8; i++) v[i] = x[k + i];
        round_activations8(v, act);
        if (k < n) for (int i = 0; i < 8; i++) y[k + i] = v[i];
    }
}
