// quant.h: GGML block formats, decoded 8 consecutive values at a time.
// Type ids are GGML's (gguf.GGMLQuantizationType). `row` points at the first byte of a
// weight row; `k` is the index of the first of the 8 values (a multiple of 8), so the 8
// values never straddle a block (32 values) or a K-quant sub-block (16 or 32 values).
#define GGML_F32 0
#define GGML_F16 1
#define GGML_Q4_0 2
#define GGML_Q4_1 3
#define GGML_Q5_0 6
#define GGML_Q5_1 7
#define GGML_Q8_0 8
#define GGML_Q4_K 12
#define GGML_Q5_K 13
#define GGML_Q6_K 14
#define GGML_BF16 30

// Every block size is even, so 2-byte loads are always aligned; 4-byte ones only where the block size
// and the offset allow (ALIGN4). Few wide loads instead of many byte loads keep the matvecs fast.
__device__ __forceinline__ u16 ld16(const u8* p) { return *(const u16*)p; }
__device__ __forceinline__ u32 ld32_2(const u8* p) { return (u32)ld16(p) | ((u32)ld16(p + 2) << 16); }

// 8 bytes starting at p as two little-endian words (p is 4-byte aligned when ALIGN4, else 2-byte).
template <bool ALIGN4>
__device__ __forceinline__ void ld8(const u8* p, u32& lo, u32& hi) {
    if (ALIGN4) { lo = *(const u32*)p; hi = *(const u32*)(p + 4); }
    else { lo = ld32_2(p); hi = ld32_2(p + 4); }
}

// byte i (0..7) of the 8 loaded bytes
__device__ __forceinline__ u32 byte_of(u32 lo, u32 hi, int i) { return ((i < 4 ? lo : hi) >> (8 * (i & 3))) & 0xFF; }

// 6-bit scale and min of sub-block j (0..7) packed in the 12 scale bytes of Q4_K / Q5_K.
__device__ __forceinline__ void k_scale_min(int j, const u8* s, float* sc, float* mn) {
    if (j < 4) {
        *sc = (float)(s[j] & 63);
        *mn = (float)(s[j + 4] & 63);
    } else {
        *sc = (float)((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
        *mn = (float)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

template <int T>
__device__ __forceinline__ void dequant8(const u8* row, int k, float* v) {
    if (T == GGML_F32) {
        const float* r = (const float*)row + k;
        for (int i = 0; i < 8; i++) v[i] = r[i];
    } else if (T == GGML_F16) {
        const u16* r = (const u16*)row + k;
        for (int i = 0; i < 8; i++) v[i] = f16_to_f32(r[i]);
    } else if (T == GGML_BF16) {
        const u16* r = (const u16*)row + k;
        for (int i = 0; i < 8; i++) v[i] = bf16_to_f32(r[i]);
    } else if (T == GGML_Q4_0) {  // d, qs[16]: value = (nibble - 8) * d
        const u8* b = row + (k / 32) * 18;
        const int i0 = k % 32, shift = i0 >= 16 ? 4 : 0;
        const float d = f16_to_f32(ld16(b));
        u32 lo, hi;
        ld8<false>(b + 2 + (i0 % 16), lo, hi);
        for (int i = 0; i < 8; i++) v[i] = (float)((int)((byte_of(lo, hi, i) >> shift) & 0xF) - 8) * d;
    } else if (T == GGML_Q4_1) {  // d, m, qs[16]: value = nibble * d + m
        const u8* b = row + (k / 32) * 20;
        const int i0 = k % 32, shift = i0 >= 16 ? 4 : 0;
        const float d = f16_to_f32(ld16(b)), m = f16_to_f32(ld16(b + 2));
        u32 lo, hi;
        ld8<true>(b + 4 + (i0 % 16), lo, hi);
        for (int i = 0; i < 8; i++) v[i] = (float)((byte_of(lo, hi, i) >> shift) & 0xF) * d + m;
    } else if (T == GGML_Q5_0) {  // d, qh[4], qs[16]: value = (nibble | bit<<4) - 16) * d
        const u8* b = row + (k / 32) * 22;
        const int i0 = k % 32, shift = i0 >= 16 ? 4 : 0;
        const float d = f16_to_f32(ld16(b));
        const u32 qh = ld32_2(b + 2);
        u32 lo, hi;
        ld8<false>(b + 6 + (i0 % 16), lo, hi);
        for (int i = 0; i < 8; i++) {
            const int q = ((byte_of(lo, hi, i) >> shift) & 0xF) | (((qh >> (i0 + i)) & 1) << 4);
            v[i] = (float)(q - 16) * d;
        }
    } else if (T == GGML_Q5_1) {  // d, m, qh[4], qs[16]: value = (nibble | bit<<4) * d + m
        const u8* b = row + (k / 32) * 24;
        const int i0 = k % 32, shift = i0 >= 16 ? 4 : 0;
        const float d = f16_to_f32(ld16(b)), m = f16_to_f32(ld16(b + 2));
        const u32 qh = *(const u32*)(b + 4);
        u32 lo, hi;
        ld8<true>(b + 8 + (i0 % 16), lo, hi);
        for (int i = 0; i < 8; i++) {
            const int q = ((byte_of(lo, hi, i) >> shift) & 0xF) | (((qh >> (i0 + i)) & 1) << 4);
            v[i] = (float)q * d + m;
        }
    } else if (T == GGML_Q8_0) {  // d, qs[32] int8
        const u8* b = row + (k / 32) * 34;
        const float d = f16_to_f32(ld16(b));
        u32 lo, hi;
        ld8<false>(b + 2 + k % 32, lo, hi);
        for (int i = 0; i < 8; i++) v[i] = (float)(i8)byte_of(lo, hi, i) * d;
    } else if (T == GGML_Q4_K) {  // d, dmin, scales[12], qs[128]; 8 sub-blocks of 32
        const u8* b = row + (k / 256) * 144;
        const int e = k % 256, j = e / 64, hi = (e % 64) >= 32, l = e % 32;
        float sc, mn;
        k_scale_min(2 * j + hi, b + 4, &sc, &mn);
        const float d = f16_to_f32(ld16(b)) * sc, m = f16_to_f32(ld16(b + 2)) * mn;
        const int shift = hi ? 4 : 0;
        u32 q0, q1;
        ld8<true>(b + 16 + 32 * j + l, q0, q1);
        for (int i = 0; i < 8; i++) v[i] = d * (float)((byte_of(q0, q1, i) >> shift) & 0xF) - m;
    } else if (T == GGML_Q5_K) {  // d, dmin, scales[12], qh[32], qs[128]
        const u8* b = row + (k / 256) * 176;
        const int e = k % 256, j = e / 64, hi = (e % 64) >= 32, l = e % 32;
        float sc, mn;
        k_scale_min(2 * j + hi, b + 4, &sc, &mn);
        const float d = f16_to_f32(ld16(b)) * sc, m = f16_to_f32(ld16(b + 2)) * mn;
        const int shift = hi ? 4 : 0, bit = 2 * j + hi;
        u32 h0, h1, q0, q1;
        ld8<true>(b + 16 + l, h0, h1);
        ld8<true>(b + 48 + 32 * j + l, q0, q1);
        for (int i = 0; i < 8; i++) {
            const int q = ((byte_of(q0, q1, i) >> shift) & 0xF) | (((byte_of(h0, h1, i) >> bit) & 1) << 4);
            v[i] = d * (float)q - m;
        }
    } else if (T == GGML_Q6_K) {  // ql[128], qh[64], scales[16] int8, d
        const u8* b = row + (k / 256) * 210;
        const int e = k % 256, h = e / 128, r = e % 128, quarter = r / 32, l = r % 32;
        const float d = f16_to_f32(ld16(b + 208)) * (float)((const i8*)(b + 192))[8 * h + l / 16 + 2 * quarter];
        const int shift = quarter >= 2 ? 4 : 0;
        u32 l0, l1, h0, h1;
        ld8<false>(b + 64 * h + l + 32 * (quarter & 1), l0, l1);
        ld8<false>(b + 128 + 32 * h + l, h0, h1);
        for (int i = 0; i < 8; i++) {
            const int q = ((byte_of(l0, l1, i) >> shift) & 0xF) | (((byte_of(h0, h1, i) >> (2 * quarter)) & 3) << 4);
            v[i] = d * (float)(q - 32);
        }
    }
}

// How llama.cpp rounds the activations that meet a weight (rocmforge/ops/matmul.py, round_activations):
// Q4_0..Q8_0 weights see 8-bit blocks of 32 with an fp16 scale, K-quants 8-bit blocks of 256 with a
// float32 scale, F16/BF16 weights see fp16/bf16 activations, F32 weights the activations as they are.
#define ACT_F32 0
#define ACT_Q8_32 1
#define ACT_Q8_256 2
#define ACT_F16 3
#define ACT_BF16 4

// One 8-bit block with llama.cpp's x86 arithmetic: q = rint(x * (127 / max|x|)), x' = q * scale, where the scale
// is fp16(max|x| / 127) for blocks of 32 and the exact reciprocal of the multiplier for blocks of 256.
__device__ __forceinline__ void round_q8(float* v, int n, float amax, bool fp16_scale) {
    const float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
    const float stored = fp16_scale ? round_f16(amax / 127.0f) : inverse > 0.0f ? 1.0f / inverse : 0.0f;
    for (int i = 0; i < n; i++) v[i] = rintf(v[i] * inverse) * stored;
}

// Round the 8 values v[] of this lane, the lanes of a warp holding consecutive groups of 8 (lane l holds
// values 8l..8l+7 of a 256-aligned span): a block of 32 is 4 lanes, a block of 256 is 32 lanes. Every
// lane of the warp must call this (it shuffles).
__device__ __forceinline__ void round_activations8(float* v, int act) {
    if (act == ACT_F16) {
        for (int i = 0; i < 8; i++) v[i] = round_f16(v[i]);
    } else if (act == ACT_BF16) {
        for (int i = 0; i < 8; i++) v[i] = round_bf16(v[i]);
    } else if (act == ACT_Q8_32 || act == ACT_Q8_256) {
        float amax = 0.0f;
        for (int i = 0; i < 8; i++) amax = fmaxf(amax, fabsf(v[i]));
        for (int m = 1; m < (act == ACT_Q8_32 ? 4 : 32); m <<= 1) amax = fmaxf(amax, shfl_xor(amax, m));
        round_q8(v, 8, amax, act == ACT_Q8_32);
    }
}

// One extern "C" kernel per type, so the host looks kernels up by plain names like matvec_q4_k.
#define RF_FOR_EACH_TYPE(X) \
    X(f32, GGML_F32) X(f16, GGML_F16) X(bf16, GGML_BF16) X(q4_0, GGML_Q4_0) X(q4_1, GGML_Q4_1) \
    X(q5_0, GGML_Q5_0) X(q5_1, GGML_Q5_1) X(q8_0, GGML_Q8_0) X(q4_k, GGML_Q4_K) X(q5_k, GGML_Q5_K) X(q6_k, GGML_Q6_K)
