// matmul_mma.hip: y = x · Wᵀ for many tokens (prefill, large batches) on the tensor cores, with llama.cpp's
// arithmetic for quantized weights (its MMQ): the activations are rounded to 8-bit blocks exactly as
// rocmforge/ops/matmul.py's round_activations does, and the integer parts of activations and weights meet
// in int8 x int8 -> int32 matrix products, scaled per block afterwards. Twin: rocmforge/ops/matmul.py
// (round_activations(x) @ dequantize(W).T); the float32 tiles of matmul.hip stay for unrounded activations
// and float weights.
//   quantize_q8:   x [rows, K] float -> int8 values, the block scale and the block's sum (per 32 values);
//                  quantize_q8_norm: the same with the RMSNorm in front of the matmul folded in.
//   mma_<type>, mma_m32_<type>: 64 (32) tokens x 64 outputs per block of 128 threads, 64-deep K steps, up to
//                  three matrices of one input per launch. Weight blocks are decoded on the fly into int8 +
//                  scale (+ offset) per group of 32 (16 for Q6_K).
// Every type here is w = d * q + m with small integers q: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K.
#include "quant.h"

// Per 32 activations: q = rint(x * 127 / amax), scale as round_activations8 keeps it (fp16 for blocks of 32, the
// exact reciprocal for blocks of 256), and scale * sum(q) for the weights' offsets m. The lanes of a warp hold
// consecutive groups of 8 of a 256-aligned span, as in round_activations8, so the rounded values are the same bits.
// Every lane of the warp calls this (it shuffles); `live` lanes (k < n) write 8 int8 values at q and, for the
// first lane of each block of 32, its scale and sum at d and s.
__device__ __forceinline__ void quantize8(const float* v, int act, bool live, i8* q, float* d, float* s) {
    float amax = 0.0f;
    for (int i = 0; i < 8; i++) amax = fmaxf(amax, fabsf(v[i]));
    for (int m = 1; m < (act == ACT_Q8_32 ? 4 : 32); m <<= 1) amax = fmaxf(amax, shfl_xor(amax, m));
    const float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
    const float stored = act == ACT_Q8_32 ? round_f16(amax / 127.0f) : inverse > 0.0f ? 1.0f / inverse : 0.0f;
    u32 lo = 0, hi = 0;
    int total = 0;
    for (int i = 0; i < 8; i++) {
        const int r = (int)rintf(v[i] * inverse);
        total += r;
        if (i < 4) lo |= (u32)(r & 0xFF) << (8 * i);
        else hi |= (u32)(r & 0xFF) << (8 * (i - 4));
    }
    total += shfl_xor_int(total, 1);  // the 4 lanes of one block of 32
    total += shfl_xor_int(total, 2);
    if (live) {
        *(uint2*)q = make_uint2(lo, hi);
        if (threadIdx.x % 4 == 0) {
            *d = stored;
            *s = stored * (float)total;
        }
    }
}

// x [rows, K] float -> xq int8 [rows, K], xd and xs [rows, K / 32]; n = rows * K values, grid-stride by warps.
extern "C" __global__ void quantize_q8(const float* x, i8* xq, float* xd, float* xs, long n, int act) {
    const long lane = threadIdx.x % RF_WARP;
    const long warps = (long)gridDim.x * (blockDim.x / RF_WARP);
    for (long base = (blockIdx.x * (long)(blockDim.x / RF_WARP) + threadIdx.x / RF_WARP) * RF_WARP * 8; base < n;
         base += warps * RF_WARP * 8) {
        const long k = base + lane * 8;
        float v[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        if (k < n) for (int i = 0; i < 8; i++) v[i] = x[k + i];
        quantize8(v, act, k < n, xq + k, xd + k / 32, xs + k / 32);
    }
}

// The same behind an RMSNorm of each row (rms_norm.hip's arithmetic with the same block size, so the same bits;
// the normalized rows are written to x_out too): one block per row, the norm's launch saved.
extern "C" __global__ void quantize_q8_norm(const float* x, const float* norm_w, float eps, float* x_out, i8* xq,
                                            float* xd, float* xs, int K, int act) {
    __shared__ double scratch[RF_MAX_WARPS];
    const long row = blockIdx.x;
    const float* xr = x + row * K;
    double ss = 0.0;
    for (int i = threadIdx.x; i < K; i += blockDim.x) ss += (double)xr[i] * xr[i];
    const float inv = rms_scale(block_sum_d(ss, scratch), K, eps);
    const int lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP, n_warps = blockDim.x / RF_WARP;
    for (int base = warp * RF_WARP * 8; base < K; base += n_warps * RF_WARP * 8) {
        const int k = base + lane * 8;
        float v[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        if (k < K)
            for (int i = 0; i < 8; i++) {
                v[i] = xr[k + i] * inv * norm_w[k + i];
                x_out[row * K + k + i] = v[i];
            }
        quantize8(v, act, k < K, xq + row * K + k, xd + (row * K + k) / 32, xs + (row * K + k) / 32);
    }
}

// Bytewise: q - c for 4 signed results packed in a word (no borrow between bytes).
__device__ __forceinline__ u32 sub_bytes(u32 q, u32 c) { return ((q | 0x80808080u) - c) ^ 0x80808080u; }
// bit i of `bits` (i = 0..3) to bit 4 of byte i
__device__ __forceinline__ u32 bits_to_bit4(u32 bits) {
    return ((bits & 1u) << 4) | ((bits & 2u) << 11) | ((bits & 4u) << 18) | ((bits & 8u) << 25);
}

// 8 weights of a row from k (k % 8 == 0) as int8 in two words, with their group's w = d * q + m.
template <int T>
__device__ __forceinline__ void qweights8(const u8* row, int k, u32& lo, u32& hi, float& d, float& m) {
    m = 0.0f;
    if (T == GGML_Q4_0) {
        const u8* b = row + (k / 32) * 18;
        const int i0 = k % 32, shift = i0 >= 16 ? 4 : 0;
        d = f16_to_f32(ld16(b));
        ld8<false>(b + 2 + (i0 % 16), lo, hi);
        lo = sub_bytes((lo >> shift) & 0x0F0F0F0Fu, 0x08080808u);
        hi = sub_bytes((hi >> shift) & 0x0F0F0F0Fu, 0x08080808u);
    } else if (T == GGML_Q4_1) {
        const u8* b = row + (k / 32) * 20;
        const int i0 = k % 32, shift = i0 >= 16 ? 4 : 0;
        d = f16_to_f32(ld16(b));
        m = f16_to_f32(ld16(b + 2));
        ld8<true>(b + 4 + (i0 % 16), lo, hi);
        lo = (lo >> shift) & 0x0F0F0F0Fu;
        hi = (hi >> shift) & 0x0F0F0F0Fu;
    } else if (T == GGML_Q5_0 || T == GGML_Q5_1) {
        const bool offset = T == GGML_Q5_1;
        const u8* b = row + (k / 32) * (offset ? 24 : 22);
        const int i0 = k % 32, shift = i0 >= 16 ? 4 : 0;
        d = f16_to_f32(ld16(b));
        if (offset) m = f16_to_f32(ld16(b + 2));
        const u32 qh = ld32_2(b + (offset ? 4 : 2)) >> i0;
        ld8<offset>(b + (offset ? 8 : 6) + (i0 % 16), lo, hi);
        lo = ((lo >> shift) & 0x0F0F0F0Fu) | bits_to_bit4(qh & 0xF);
        hi = ((hi >> shift) & 0x0F0F0F0Fu) | bits_to_bit4((qh >> 4) & 0xF);
        if (!offset) { lo = sub_bytes(lo, 0x10101010u); hi = sub_bytes(hi, 0x10101010u); }
    } else if (T == GGML_Q8_0) {
        const u8* b = row + (k / 32) * 34;
        d = f16_to_f32(ld16(b));
        ld8<false>(b + 2 + k % 32, lo, hi);
    } else if (T == GGML_Q4_K || T == GGML_Q5_K) {
        const bool five = T == GGML_Q5_K;
        const u8* b = row + (k / 256) * (five ? 176 : 144);
        const int e = k % 256, j = e / 64, up = (e % 64) >= 32, l = e % 32;
        float sc, mn;
        k_scale_min(2 * j + up, b + 4, &sc, &mn);
        d = f16_to_f32(ld16(b)) * sc;
        m = -f16_to_f32(ld16(b + 2)) * mn;
        const int shift = up ? 4 : 0;
        ld8<true>(b + (five ? 48 : 16) + 32 * j + l, lo, hi);
        lo = (lo >> shift) & 0x0F0F0F0Fu;
        hi = (hi >> shift) & 0x0F0F0F0Fu;
        if (five) {
            u32 h0, h1;
            ld8<true>(b + 16 + l, h0, h1);
            const int bit = 2 * j + up;
            lo |= ((h0 >> bit) & 0x01010101u) << 4;
            hi |= ((h1 >> bit) & 0x01010101u) << 4;
        }
    } else if (T == GGML_Q6_K) {  // groups of 16: the int8 scale changes every 16 values
        const u8* b = row + (k / 256) * 210;
        const int e = k % 256, h = e / 128, r = e % 128, quarter = r / 32, l = r % 32;
        d = f16_to_f32(ld16(b + 208)) * (float)((const i8*)(b + 192))[8 * h + l / 16 + 2 * quarter];
        const int shift = quarter >= 2 ? 4 : 0;
        u32 h0, h1;
        ld8<false>(b + 64 * h + l + 32 * (quarter & 1), lo, hi);
        ld8<false>(b + 128 + 32 * h + l, h0, h1);
        lo = sub_bytes(((lo >> shift) & 0x0F0F0F0Fu) | (((h0 >> (2 * quarter)) & 0x03030303u) << 4), 0x20202020u);
        hi = sub_bytes(((hi >> shift) & 0x0F0F0F0Fu) | (((h1 >> (2 * quarter)) & 0x03030303u) << 4), 0x20202020u);
    }
}

#define MMA_BN 64
#define MMA_BK 64
#define MMA_STRIDE 80  // bytes per tile row in shared memory: 64 values + 16; fragment loads hit 32 distinct banks

#if defined(__HIP__) || defined(__HIPCC_RTC__)
// sum of the 4 signed byte products of two words (one v_dot4 instruction where the target has it)
__device__ __forceinline__ int dot4(u32 a, u32 b) {
#if __has_builtin(__builtin_amdgcn_sdot4)
    return __builtin_amdgcn_sdot4((int)a, (int)b, 0, false);
#else
    int s = 0;
    for (int i = 0; i < 32; i += 8) s += (int)(i8)(a >> i) * (int)(i8)(b >> i);
    return s;
#endif
}
#endif

// c[0..3] += A[16 rows at a][kk, kk+16) · B[8 rows at b][kk, kk+16) for this lane's four outputs:
// (row g, col 2t), (g, 2t+1), (g + 8, 2t), (g + 8, 2t + 1) with g = lane / 4, t = lane % 4 (the mma's C layout).
// NVIDIA: one int8 mma.sync m16n8k16 over the 32 lanes of a warp. Elsewhere (HIP; the AMD matrix-core
// variant is not written yet) each lane computes its four sums itself from shared memory, which needs no
// particular wave size: "lane" is the thread's index within its group of 32 threads.
__device__ __forceinline__ void tile_mma16(const u8* a, const u8* b, int kk, int lane, int* c) {
    const int g = lane / 4, t = lane % 4;
#if defined(__HIP__) || defined(__HIPCC_RTC__)
    #pragma unroll 1  // one 4-byte word of each operand at a time: unrolled, the loads fill the registers
    for (int w = 0; w < 16; w += 4) {
        const u32 a0 = *(const u32*)(a + g * MMA_STRIDE + kk + w);
        const u32 a1 = *(const u32*)(a + (g + 8) * MMA_STRIDE + kk + w);
        const u32 b0 = *(const u32*)(b + 2 * t * MMA_STRIDE + kk + w);
        const u32 b1 = *(const u32*)(b + (2 * t + 1) * MMA_STRIDE + kk + w);
        c[0] += dot4(a0, b0);
        c[1] += dot4(a0, b1);
        c[2] += dot4(a1, b0);
        c[3] += dot4(a1, b1);
    }
#else
    const u32 a0 = *(const u32*)(a + g * MMA_STRIDE + kk + t * 4);
    const u32 a1 = *(const u32*)(a + (g + 8) * MMA_STRIDE + kk + t * 4);
    const u32 b0 = *(const u32*)(b + g * MMA_STRIDE + kk + t * 4);
    asm volatile("mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};"
                 : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                 : "r"(a0), "r"(a1), "r"(b0));
#endif
}

// One BM x 64 tile of Y. The 128 threads are 4 groups of 32 in a 2 x 2 arrangement; each group owns
// (BM / 2) x 32 outputs = MT x 4 fragments of 16 x 8. Per 64-deep K step: every thread copies its share of the
// int8 activations and decodes 32 weights of one row (one group of 32, or two of 16) into shared memory, with the
// scales beside them; then the groups multiply, and each 32-group's int32 sums are scaled into float accumulators.
// The next step's loads are issued before this step's products (always, clamped at the end, so the compiler
// can overlap them). Inlined, as mma_matrices is: on AMD the shared arrays of a function left out of line are
// allocated in every kernel of the module.
template <int T, int BM>
__device__ __forceinline__ void mma_tile(const u8* W, long row_bytes, const i8* Xq, const float* Xd, const float* Xs,
                                         float* Y, int M, int N, int K, const float* add, float* sum, int n_tile) {
    constexpr bool OFFSET = T == GGML_Q4_1 || T == GGML_Q5_1 || T == GGML_Q4_K || T == GGML_Q5_K;
    constexpr bool G16 = T == GGML_Q6_K;
    constexpr int MT = BM / 32;              // 16-row fragments per group
    constexpr int A_THREADS = 128 / BM;      // threads per activation row; each copies 64 / A_THREADS bytes
    __shared__ __align__(16) u8 as[BM * MMA_STRIDE];
    __shared__ __align__(16) u8 bs[MMA_BN * MMA_STRIDE];
    __shared__ float a_scale[BM][2], a_sum[BM][2], w_scale[MMA_BN][4], w_offset[MMA_BN][2];
    const int tid = threadIdx.x, lane = tid % 32, group = tid / 32;
    const int m0 = blockIdx.y * BM, n0 = n_tile * MMA_BN;
    const int K32 = K / 32;
    // this thread's share of the loads
    const int a_row = tid / A_THREADS, a_col = (tid % A_THREADS) * (MMA_BK / A_THREADS);
    const int w_row = tid / 2, w_col = (tid % 2) * 32;
    const bool a_ok = m0 + a_row < M, w_ok = n0 + w_row < N;
    const i8* a_src = Xq + (long)(a_ok ? m0 + a_row : 0) * K;  // this thread's activation row
    const u8* w_src = W + (long)(w_ok ? n0 + w_row : 0) * row_bytes;

    uint4 a_next[MMA_BK / A_THREADS / 16];
    float a_next_scale = 0.0f, a_next_sum = 0.0f;
    u32 w_next[8];
    float w_next_d[2], w_next_m = 0.0f;
    auto load = [&](int k0) {  // columns past K (a last half step) load column 0 again; the store zeroes them
        for (int i = 0; i < MMA_BK / A_THREADS / 16; i++) {
            const int k = k0 + a_col + 16 * i;
            a_next[i] = *(const uint4*)(a_src + (k < K ? k : 0));
        }
        if (a_col % 32 == 0) {
            const int k = k0 + a_col;
            const long g32 = (long)(a_ok ? m0 + a_row : 0) * K32 + (k < K ? k : 0) / 32;
            a_next_scale = Xd[g32];
            a_next_sum = Xs[g32];
        }
        const int kw = k0 + w_col < K ? k0 + w_col : 0;
        for (int h = 0; h < 4; h++) {
            float d, m;
            qweights8<T>(w_src, kw + 8 * h, w_next[2 * h], w_next[2 * h + 1], d, m);
            if (h % 2 == 0) w_next_d[h / 2] = d;
            w_next_m = m;
        }
    };
    float acc[MT][4][4] = {};
    const int wm = (group / 2) * (BM / 2), wn = (group % 2) * 32;
    load(0);
    for (int k0 = 0; k0 < K; k0 += MMA_BK) {
        // K is a multiple of 32: in a last half step the upper 32 columns are zeros
        const bool half = k0 + 32 >= K;
        for (int i = 0; i < MMA_BK / A_THREADS / 16; i++) {
            uint4 v = a_ok ? a_next[i] : make_uint4(0, 0, 0, 0);
            if (half && a_col + 16 * i >= 32) v = make_uint4(0, 0, 0, 0);
            *(uint4*)(as + a_row * MMA_STRIDE + a_col + 16 * i) = v;
        }
        if (a_col % 32 == 0) {
            a_scale[a_row][a_col / 32] = a_ok ? a_next_scale : 0.0f;
            a_sum[a_row][a_col / 32] = a_ok ? a_next_sum : 0.0f;
        }
        const bool w_live = w_ok && !(half && w_col >= 32);
        for (int i = 0; i < 8; i += 4)
            *(uint4*)(bs + w_row * MMA_STRIDE + w_col + 4 * i) =
                w_live ? make_uint4(w_next[i], w_next[i + 1], w_next[i + 2], w_next[i + 3]) : make_uint4(0, 0, 0, 0);
        w_scale[w_row][w_col / 16] = w_live ? w_next_d[0] : 0.0f;
        w_scale[w_row][w_col / 16 + 1] = w_live ? w_next_d[1] : 0.0f;
        w_offset[w_row][w_col / 32] = w_live ? w_next_m : 0.0f;
        __syncthreads();
        load(k0 + MMA_BK < K ? k0 + MMA_BK : k0);  // the last step loads itself again: no branch
        #pragma unroll
        for (int g32 = 0; g32 < 2; g32++) {
            #pragma unroll
            for (int h = 0; h < (G16 ? 2 : 1); h++) {  // groups of 32: both 16-deep halves go into one int32 sum
                int c[MT][4][4] = {};
                #pragma unroll
                for (int mt = 0; mt < MT; mt++)
                    #pragma unroll
                    for (int nt = 0; nt < 4; nt++) {
                        const u8* a = as + (wm + 16 * mt) * MMA_STRIDE;
                        const u8* b = bs + (wn + 8 * nt) * MMA_STRIDE;
                        if (G16) {
                            tile_mma16(a, b, 32 * g32 + 16 * h, lane, c[mt][nt]);
                        } else {
                            tile_mma16(a, b, 32 * g32, lane, c[mt][nt]);
                            tile_mma16(a, b, 32 * g32 + 16, lane, c[mt][nt]);
                        }
                    }
                #pragma unroll
                for (int mt = 0; mt < MT; mt++)
                    #pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int r = wm + 16 * mt + lane / 4 + (e >> 1) * 8;
                        const float sa = a_scale[r][g32], ss = a_sum[r][g32];
                        #pragma unroll
                        for (int nt = 0; nt < 4; nt++) {
                            const int col = wn + 8 * nt + 2 * (lane % 4) + (e & 1);
                            float v = (float)c[mt][nt][e] * (sa * w_scale[col][2 * g32 + h]);
                            if (OFFSET) v += w_offset[col][g32] * ss;
                            acc[mt][nt][e] += v;
                        }
                    }
            }
        }
        __syncthreads();
    }
    for (int mt = 0; mt < MT; mt++)
        for (int e = 0; e < 4; e++) {
            const int m = m0 + wm + 16 * mt + lane / 4 + (e >> 1) * 8;
            if (m >= M) continue;
            for (int nt = 0; nt < 4; nt++) {
                const int n = n0 + wn + 8 * nt + 2 * (lane % 4) + (e & 1);
                if (n >= N) continue;
                const long o = (long)m * N + n;
                Y[o] = acc[mt][nt][e];
                if (sum) sum[o] = acc[mt][nt][e] + add[o];
            }
        }
}

// Up to three matrices that share the input (q, k, v) in one launch: blockIdx.x numbers their 64-output tiles
// one matrix after another. The residual add is for a single matrix.
template <int T, int BM>
__device__ __forceinline__ void mma_matrices(const i8* Xq, const float* Xd, const float* Xs, int M, int K, const u8* W0,
                                             long rb0, float* Y0, int N0, const u8* W1, long rb1, float* Y1, int N1,
                                             const u8* W2, long rb2, float* Y2, int N2, const float* add, float* sum) {
    const int t0 = (N0 + MMA_BN - 1) / MMA_BN, t1 = (N1 + MMA_BN - 1) / MMA_BN, t = blockIdx.x;
    if (t < t0) mma_tile<T, BM>(W0, rb0, Xq, Xd, Xs, Y0, M, N0, K, add, sum, t);
    else if (t < t0 + t1) mma_tile<T, BM>(W1, rb1, Xq, Xd, Xs, Y1, M, N1, K, nullptr, nullptr, t - t0);
    else mma_tile<T, BM>(W2, rb2, Xq, Xd, Xs, Y2, M, N2, K, nullptr, nullptr, t - t0 - t1);
}

#define RF_MMA_KERNEL(kernel, T, BM)                                                                             \
    extern "C" __global__ void __launch_bounds__(128) kernel(                                                   \
        const i8* Xq, const float* Xd, const float* Xs, int M, int K, const u8* W0, long rb0, float* Y0, int N0,  \
        const u8* W1, long rb1, float* Y1, int N1, const u8* W2, long rb2, float* Y2, int N2, const float* add,  \
        float* sum) {                                                                                            \
        mma_matrices<T, BM>(Xq, Xd, Xs, M, K, W0, rb0, Y0, N0, W1, rb1, Y1, N1, W2, rb2, Y2, N2, add, sum);     \
    }
#define RF_MMA_KERNELS(name, T) RF_MMA_KERNEL(mma_##name, T, 64) RF_MMA_KERNEL(mma_m32_##name, T, 32)
RF_MMA_KERNELS(q4_0, GGML_Q4_0)
RF_MMA_KERNELS(q4_1, GGML_Q4_1)
RF_MMA_KERNELS(q5_0, GGML_Q5_0)
RF_MMA_KERNELS(q5_1, GGML_Q5_1)
RF_MMA_KERNELS(q8_0, GGML_Q8_0)
RF_MMA_KERNELS(q4_k, GGML_Q4_K)
RF_MMA_KERNELS(q5_k, GGML_Q5_K)
RF_MMA_KERNELS(q6_k, GGML_Q6_K)
