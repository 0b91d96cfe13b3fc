// matmul.hip: fused dequantize-and-multiply, y = x · Wᵀ, with W stored row by row in a GGML
// format (one row per output feature).
//   matvec_<type>: one token (decode). The input row is staged once per block in shared memory, then each
//                  warp reduces a few output rows. Up to three matrices with the same input go in one
//                  launch; an RMSNorm in front, a residual add or rope + KV store behind can be fused.
//   matvec_glu_<type>: gate and up rows of the MLP together, with SiLU/GELU applied.
//   matmul_<type>, matmul_m32_<type>: many tokens (prefill). 64 (or 32) tokens x 64 outputs per tile,
//                  32-deep K slices; the weight slice is decoded once into shared memory and used by
//                  all the tile's tokens. A residual
//                  add can be fused behind it: sum = Y + add.
#include "quant.h"

// Decode. A block first turns the input row into what every matrix row multiplies with — RMSNorm'd when a
// norm is folded in front (block 0 also writes the normalized row for whoever reads it later) and rounded
// as llama.cpp does for the weight type — once, into shared memory (K floats, dynamic). Then each warp takes
// `rows_per_warp` output rows, one after another; its lanes walk a row 8 values at a time and meet in a
// warp reduction. Uniform loops throughout: the rounding and the reductions shuffle across lanes.
__device__ void stage_input(const float* x, int K, int act, const float* norm_w, float eps, float* x_out, float* xs) {
    __shared__ double scratch[RF_MAX_WARPS];
    const int lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP, n_warps = blockDim.x / RF_WARP;
    const int chunk = n_warps * RF_WARP * 8, k_first = warp * RF_WARP * 8 + lane * 8;
    // this lane's first 8 inputs and norm weights are loaded up front: the norm's reduction and the weights'
    // load then overlap instead of following each other (most rows are one chunk long). Later chunks reload
    // the same arrays: indexing them only with unrolled constants keeps them in registers on AMD (a pointer
    // chosen between them and global memory put them in scratch).
    float xc[8], wc[8];
    for (int i = 0; i < 8; i++) {
        xc[i] = k_first < K ? x[k_first + i] : 0.0f;
        wc[i] = norm_w && k_first < K ? norm_w[k_first + i] : 1.0f;
    }
    float scale = 1.0f;
    if (norm_w) {  // squares summed in double, as llama.cpp does
        double ss = 0.0;
        for (int i = 0; i < 8; i++) ss += (double)xc[i] * xc[i];
        for (int k = k_first + chunk; k < K; k += chunk)
            for (int i = 0; i < 8; i++) ss += (double)x[k + i] * x[k + i];
        scale = rms_scale(block_sum_d(ss, scratch), K, eps);
    }
    for (int base = warp * RF_WARP * 8; base < K; base += chunk) {
        const int k = base + lane * 8;
        if (base != warp * RF_WARP * 8 && k < K)
            for (int i = 0; i < 8; i++) {
                xc[i] = x[k + i];
                wc[i] = norm_w ? norm_w[k + i] : 1.0f;
            }
        float v[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        if (k < K) {
            for (int i = 0; i < 8; i++) v[i] = norm_w ? xc[i] * scale * wc[i] : xc[i];
            if (norm_w && x_out && blockIdx.x == 0)
                for (int i = 0; i < 8; i++) x_out[k + i] = v[i];
        }
        round_activations8(v, act);
        if (k < K)
            for (int i = 0; i < 8; i++) xs[k + i] = v[i];
    }
    __syncthreads();
}

template <int T>
__device__ __forceinline__ float row_dot(const u8* row, const float* xs, int K, int lane) {
    float acc = 0.0f;
    #pragma unroll 4  // rows are a few hundred to a few thousand long: issue their loads together
    for (int k = lane * 8; k < K; k += RF_WARP * 8) {
        float w[8];
        dequant8<T>(row, k, w);
        const float4 a = *(const float4*)(xs + k), b = *(const float4*)(xs + k + 4);
        acc += w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * b.x + w[5] * b.y + w[6] * b.z + w[7] * b.w;
    }
    return warp_sum(acc);
}

// Start a row's bytes on their way from memory while the block stages the input.
__device__ __forceinline__ void prefetch_row(const u8* row, long row_bytes, int lane) {
    for (long o = lane * 128L; o < row_bytes; o += RF_WARP * 128L) prefetch_l2(row + o);
}

// Rotary embedding and KV-cache store folded behind the q/k/v matvec of a decode step (normal, non-NeoX
// rope over whole heads, so the pair (2i, 2i+1) of a head are two rows handled by warps w and w ^ 1 of the
// same block). rot[j] non-null: rows of matrix j are rotated into rot[j]; k_pool non-null: the rotated rows
// of matrix 1 (keys) and the rows of matrix 2 (values) are also written to the cache at slots[0].
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

// Up to three matrices that share one input (q, k, v) in one launch, rows numbered across the matrices.
// An optional RMSNorm in front (norm_w non-null), for a single matrix an optional residual add behind it
// (sum = y + add), and for q/k/v the rope epilogue above.
template <int T>
__device__ void matvec(const float* x, int K, int act, const float* norm_w, float eps, float* x_out,
                       const u8* W0, long rb0, float* y0, int N0, const u8* W1, long rb1, float* y1, int N1,
                       const u8* W2, long rb2, float* y2, int N2, const float* add, float* sum, int rows_per_warp,
                       RopeEpilogue rope) {
    extern __shared__ float xs[];
    __shared__ float dots[RF_MAX_WARPS];
    const int lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP, n_warps = blockDim.x / RF_WARP;
    const int first = blockIdx.x * rows_per_warp * n_warps + warp;
    for (int i = 0; i < rows_per_warp; i++) {
        int n = first + i * n_warps;
        const long rb = n < N0 ? rb0 : n < N0 + N1 ? rb1 : rb2;
        const u8* W = n < N0 ? W0 + n * rb0 : n < N0 + N1 ? W1 + (n - N0) * rb1 : W2 + (long)(n - N0 - N1) * rb2;
        if (n < N0 + N1 + N2) prefetch_row(W, rb, lane);
    }
    // what the epilogue reads is loaded before the dot products, so its latency hides behind them
    const double position = rope.positions ? (double)rope.positions[0] : 0.0;
    const long slot = rope.k_pool ? (long)rope.slots[0] : 0;
    stage_input(x, K, act, norm_w, eps, x_out, xs);
    for (int i = 0; i < rows_per_warp; i++) {
        int n = first + i * n_warps, matrix = 0;
        const u8* W = W0; long rb = rb0; float* y = y0;
        if (n >= N0) {
            n -= N0; W = W1; rb = rb1; y = y1; matrix = 1;
            if (n >= N1) { n -= N1; W = W2; rb = rb2; y = y2; matrix = 2; }
        }
        const bool valid = matrix < 2 || n < N2;
        const float residual = sum && valid ? add[n] : 0.0f;
        const double inv_freq = rope.positions ? rope.inv_freq[(n % rope.head_dim) / 2] : 0.0;
        const float dot = valid ? row_dot<T>(W + n * rb, xs, K, lane) : 0.0f;
        if (valid && lane == 0) {
            y[n] = dot;
            if (sum) sum[n] = dot + residual;
        }
        if (!rope.positions) continue;  // uniform: every warp of the block takes the same branch
        if (lane == 0) dots[warp] = dot;
        __syncthreads();
        float* rot = matrix == 0 ? rope.rot0 : matrix == 1 ? rope.rot1 : nullptr;
        if (valid && lane == 0 && rot) {
            const double angle = position * inv_freq;
            float sn, cs;
            sincosf((float)(angle - 6.283185307179586 * rint(angle * 0.15915494309189535)), &sn, &cs);
            const float x0 = dots[warp & ~1], x1 = dots[warp | 1];
            const float r = (n & 1) ? x0 * sn + x1 * cs : x0 * cs - x1 * sn;
            rot[n] = r;
            if (matrix == 1 && rope.k_pool) rope.k_pool[slot * N1 + n] = r;
        } else if (valid && lane == 0 && matrix == 2 && rope.v_pool) {
            rope.v_pool[slot * N2 + n] = dot;
        }
        __syncthreads();  // dots is reused by the next row
    }
}

// The MLP gate in one pass: g = Wg·x, u = Wu·x, y = act(g) * u; act 0 = SiLU, 1 = GELU (tanh form).
template <int T>
__device__ void matvec_glu(const float* x, int K, int act_round, const float* norm_w, float eps, float* x_out,
                           const u8* Wg, const u8* Wu, long rb, float* g, float* u, float* y, int N, int act,
                           int rows_per_warp) {
    extern __shared__ float xs[];
    const int lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP, n_warps = blockDim.x / RF_WARP;
    const int first = blockIdx.x * rows_per_warp * n_warps + warp;
    for (int i = 0; i < rows_per_warp; i++) {
        const int n = first + i * n_warps;
        if (n < N) {
            prefetch_row(Wg + n * rb, rb, lane);
            prefetch_row(Wu + n * rb, rb, lane);
        }
    }
    stage_input(x, K, act_round, norm_w, eps, x_out, xs);
    for (int i = 0; i < rows_per_warp; i++) {
        const int n = first + i * n_warps;
        if (n >= N) return;
        const float gn = row_dot<T>(Wg + n * rb, xs, K, lane);
        const float un = row_dot<T>(Wu + n * rb, xs, K, lane);
        if (lane == 0) {
            const float a = act == 0 ? gn / (1.0f + expf(-gn))
                                     : 0.5f * gn * (1.0f + tanhf(0.7978845608028654f * (gn + 0.044715f * gn * gn * gn)));
            g[n] = gn;
            u[n] = un;
            y[n] = a * un;
        }
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
    extern "C" __global__ void matvec_##name(                                                                    \
        const float* x, int K, int act, const float* norm_w, float eps, float* x_out, const u8* W0, long rb0,     \
        float* y0, int N0, const u8* W1, long rb1, float* y1, int N1, const u8* W2, long rb2, float* y2, int N2,  \
        const float* add, float* sum, int rows_per_warp, const int* positions, const double* inv_freq,            \
        int head_dim, float* rot0, float* rot1, float* k_pool, float* v_pool, const int* slots) {                 \
        const RopeEpilogue rope = {positions, inv_freq, head_dim, rot0, rot1, k_pool, v_pool, slots};           \
        matvec<T>(x, K, act, norm_w, eps, x_out, W0, rb0, y0, N0, W1, rb1, y1, N1, W2, rb2, y2, N2, add, sum,     \
                  rows_per_warp, rope);                                                                          \
    }                                                                                                            \
    extern "C" __global__ void matvec_glu_##name(const float* x, int K, int act_round, const float* norm_w,       \
                                                 float eps, float* x_out, const u8* Wg, const u8* Wu, long rb,    \
                                                 float* g, float* u, float* y, int N, int act, int rows_per_warp) { \
        matvec_glu<T>(x, K, act_round, norm_w, eps, x_out, Wg, Wu, rb, g, u, y, N, act, rows_per_warp);          \
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

// Batched decode: M token rows (one per sequence) against the same matrices, as in matvec but with every
// weight value read once for all the rows of a chunk. A block stages a chunk of up to RF_ROWS rows (RMSNorm'd when
// a norm is folded in, and rounded; grid.y spreads the chunks over blocks), then each warp takes its output rows
// and dots each weight slice with every staged row. A row's result depends only on that row: the per-lane order over K and the
// warp reduction are those of row_dot whatever M, the chunk or the row's place in it (batch invariance).
#define RF_ROWS 16  // most rows a block stages at once: one accumulator each in registers

template <int T, int NW>
__device__ __forceinline__ void rows_dot(const u8* const* rows, const float* xs, int K, int R, int lane,
                                         float (*acc)[RF_ROWS]) {
    for (int k = lane * 8; k < K; k += RF_WARP * 8) {
        #pragma unroll
        for (int m = 0; m < NW; m++) {
            float w[8];
            dequant8<T>(rows[m], k, w);
            #pragma unroll
            for (int r = 0; r < RF_ROWS; r++) {
                if (r < R) {
                    const float4 a = *(const float4*)(xs + r * K + k), b = *(const float4*)(xs + r * K + k + 4);
                    acc[m][r] += w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * b.x + w[5] * b.y +
                                 w[6] * b.z + w[7] * b.w;
                }
            }
        }
    }
    #pragma unroll
    for (int m = 0; m < NW; m++)
        #pragma unroll
        for (int r = 0; r < RF_ROWS; r++)
            if (r < R) acc[m][r] = warp_sum(acc[m][r]);
}

// Stage rows m0 .. m0 + R - 1 of x into xs: RMSNorm'd when norm_w is given (block 0 also writes the normalized
// rows to x_out), then rounded as llama.cpp does for the weight type. Each row's sum of squares is one warp's
// (lanes stride over K in double, then a fixed shuffle tree), so it does not depend on the block or the batch.
__device__ __forceinline__ double warp_sum_d(double v) {
#if defined(__HIP__) || defined(__HIPCC_RTC__)
    for (int m = RF_WARP / 2; m > 0; m >>= 1) v += __shfl_xor(v, m, RF_WARP);
#else
    for (int m = RF_WARP / 2; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m, RF_WARP);
#endif
    return v;
}

__device__ void stage_rows(const float* x, int m0, int R, int K, int act, const float* norm_w, float eps,
                           float* x_out, float* xs) {
    __shared__ float row_scale[RF_ROWS];
    const int lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP, n_warps = blockDim.x / RF_WARP;
    if (norm_w) {
        for (int r = warp; r < R; r += n_warps) {
            const float* xr = x + (long)(m0 + r) * K;
            double ss = 0.0;
            for (int k = lane; k < K; k += RF_WARP) ss += (double)xr[k] * xr[k];
            ss = warp_sum_d(ss);
            if (lane == 0) row_scale[r] = rms_scale(ss, K, eps);
        }
        __syncthreads();
    }
    const int chunk = n_warps * RF_WARP * 8;
    for (int r = 0; r < R; r++) {
        const float* xr = x + (long)(m0 + r) * K;
        const float scale = norm_w ? row_scale[r] : 1.0f;
        for (int base = warp * RF_WARP * 8; base < K; base += chunk) {  // uniform per warp: the rounding shuffles
            const int k = base + lane * 8;
            float v[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
            if (k < K) {
                #pragma unroll
                for (int i = 0; i < 8; i++) v[i] = norm_w ? xr[k + i] * scale * norm_w[k + i] : xr[k + i];
                if (norm_w && x_out && blockIdx.x == 0)
                    for (int i = 0; i < 8; i++) x_out[(long)(m0 + r) * K + k + i] = v[i];
            }
            round_activations8(v, act);
            if (k < K)
                #pragma unroll
                for (int i = 0; i < 8; i++) xs[r * K + k + i] = v[i];
        }
    }
    __syncthreads();
}

// Up to three matrices of one input (q, k, v), rows numbered across them; for a single matrix an optional
// residual add behind it (sum = y + add). Outputs are [M, N_j].
template <int T>
__device__ void matvec_rows(const float* x, int M, int K, int act, const float* norm_w, float eps, float* x_out,
                            const u8* W0, long rb0, float* y0, int N0, const u8* W1, long rb1, float* y1, int N1,
                            const u8* W2, long rb2, float* y2, int N2, const float* add, float* sum,
                            int rows_per_warp, int chunk) {
    extern __shared__ float xs[];
    const int lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP, n_warps = blockDim.x / RF_WARP;
    const int first = blockIdx.x * rows_per_warp * n_warps + warp;
    for (int m0 = blockIdx.y * chunk; m0 < M; m0 += gridDim.y * chunk) {  // grid.y: chunks of rows side by side
        const int R = min(chunk, M - m0);
        stage_rows(x, m0, R, K, act, norm_w, eps, x_out, xs);
        for (int i = 0; i < rows_per_warp; i++) {
            int n = first + i * n_warps;
            if (n >= N0 + N1 + N2) break;  // uniform across the warp
            const u8* W = W0; long rb = rb0; float* y = y0; int N = N0;
            if (n >= N0) {
                n -= N0; W = W1; rb = rb1; y = y1; N = N1;
                if (n >= N1) { n -= N1; W = W2; rb = rb2; y = y2; N = N2; }
            }
            const u8* row = W + n * rb;
            float acc[1][RF_ROWS] = {};
            rows_dot<T, 1>(&row, xs, K, R, lane, acc);
            if (lane == 0) {
                #pragma unroll
                for (int r = 0; r < RF_ROWS; r++) {
                    if (r < R) {
                        const long o = (long)(m0 + r) * N + n;
                        y[o] = acc[0][r];
                        if (sum) sum[o] = acc[0][r] + add[o];
                    }
                }
            }
        }
        __syncthreads();  // the next chunk overwrites xs
    }
}

// The MLP gate of M rows: g = Wg·x, u = Wu·x, y = act(g) * u (act 0 = SiLU, 1 = GELU, tanh form).
template <int T>
__device__ void matvec_rows_glu(const float* x, int M, int K, int act_round, const float* norm_w, float eps,
                                float* x_out, const u8* Wg, const u8* Wu, long rb, float* g, float* u, float* y, int N,
                                int act, int rows_per_warp, int chunk) {
    extern __shared__ float xs[];
    const int lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP, n_warps = blockDim.x / RF_WARP;
    const int first = blockIdx.x * rows_per_warp * n_warps + warp;
    for (int m0 = blockIdx.y * chunk; m0 < M; m0 += gridDim.y * chunk) {  // grid.y: chunks of rows side by side
        const int R = min(chunk, M - m0);
        stage_rows(x, m0, R, K, act_round, norm_w, eps, x_out, xs);
        for (int i = 0; i < rows_per_warp; i++) {
            const int n = first + i * n_warps;
            if (n >= N) break;
            const u8* rows[2] = {Wg + n * rb, Wu + n * rb};
            float acc[2][RF_ROWS] = {};
            rows_dot<T, 2>(rows, xs, K, R, lane, acc);
            if (lane == 0) {
                #pragma unroll
                for (int r = 0; r < RF_ROWS; r++) {
                    if (r < R) {
                        const float gn = acc[0][r], un = acc[1][r];
                        const float a = act == 0 ? gn / (1.0f + expf(-gn))
                                                 : 0.5f * gn * (1.0f + tanhf(0.7978845608028654f * (gn + 0.044715f * gn * gn * gn)));
                        const long o = (long)(m0 + r) * N + n;
                        g[o] = gn;
                        u[o] = un;
                        y[o] = a * un;
                    }
                }
            }
        }
        __syncthreads();
    }
}

#define RF_MATVEC_ROWS_KERNELS(name, T)                                                                          \
    extern "C" __global__ void RF_AMD_MAX_THREADS(256) matvec_rows_##name(                                                           \
        const float* x, int M, int K, int act, const float* norm_w, float eps, float* x_out, const u8* W0,       \
        long rb0, float* y0, int N0, const u8* W1, long rb1, float* y1, int N1, const u8* W2, long rb2,          \
        float* y2, int N2, const float* add, float* sum, int rows_per_warp, int chunk) {                         \
        matvec_rows<T>(x, M, K, act, norm_w, eps, x_out, W0, rb0, y0, N0, W1, rb1, y1, N1, W2, rb2, y2, N2, add, \
                       sum, rows_per_warp, chunk);                                                               \
    }                                                                                                            \
    extern "C" __global__ void RF_AMD_MAX_THREADS(256) matvec_rows_glu_##name(                                                       \
        const float* x, int M, int K, int act_round, const float* norm_w, float eps, float* x_out, const u8* Wg, \
        const u8* Wu, long rb, float* g, float* u, float* y, int N, int act, int rows_per_warp, int chunk) {     \
        matvec_rows_glu<T>(x, M, K, act_round, norm_w, eps, x_out, Wg, Wu, rb, g, u, y, N, act, rows_per_warp,   \
                           chunk);                                                                               \
    }
RF_FOR_EACH_TYPE(RF_MATVEC_ROWS_KERNELS)
