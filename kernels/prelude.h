// prelude.h: the few names that differ between HIP (hiprtc) and CUDA (NVRTC).
// Every kernel source is compiled with this text in front of it and with
// -DRF_WARP=<warp size read from the device>: 64 on CDNA / RDNA wave64, 32 on NVIDIA.
// Reductions below are written for either width.
#ifndef RF_WARP
#error "RF_WARP (the device's warp/wavefront size) must be defined by the compiler options"
#endif

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define RF_NEG_INF (__int_as_float(0xff800000))

#define RF_MAX_WARPS 32  // 1024 threads / 32 lanes: enough scratch for any block size

#if defined(__HIP__) || defined(__HIPCC_RTC__)
__device__ __forceinline__ float shfl_xor(float v, int mask) { return __shfl_xor(v, mask, RF_WARP); }
__device__ __forceinline__ int shfl_xor_int(int v, int mask) { return __shfl_xor(v, mask, RF_WARP); }
__device__ __forceinline__ float f16_to_f32(u16 h) { return (float)__builtin_bit_cast(_Float16, h); }
__device__ __forceinline__ float shfl(float v, int src) { return __shfl(v, src, RF_WARP); }
__device__ __forceinline__ int shfl_int(int v, int src) { return __shfl(v, src, RF_WARP); }
#else
__device__ __forceinline__ float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask, RF_WARP); }
__device__ __forceinline__ int shfl_xor_int(int v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask, RF_WARP); }
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ float shfl(float v, int src) { return __shfl_sync(0xffffffffu, v, src, RF_WARP); }
__device__ __forceinline__ int shfl_int(int v, int src) { return __shfl_sync(0xffffffffu, v, src, RF_WARP); }
#endif

// hipcc assumes blocks of up to 1024 threads unless told, which caps a kernel at 128 VGPRs and made
// attn_decode_d128 spill to scratch (388 bytes per lane on gfx90a). NVIDIA's compiler needs no such hint.
#if defined(__HIP__) || defined(__HIPCC_RTC__)
#define RF_AMD_MAX_THREADS(n) __launch_bounds__(n)
#else
#define RF_AMD_MAX_THREADS(n)
#endif

// Ask for a cache line to be brought into L2 now (its load comes later); a no-op on HIP.
#if defined(__HIP__) || defined(__HIPCC_RTC__)
__device__ __forceinline__ void prefetch_l2(const void* p) {}
#else
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }
#endif

// Read a value another block of this launch wrote (it fenced, then took a ticket): from L2, never a stale L1
// line. Unlike a volatile read, such loads can be issued together.
#if defined(__HIP__) || defined(__HIPCC_RTC__)
__device__ __forceinline__ float load_l2(const float* p) { return *(const volatile float*)p; }
#else
__device__ __forceinline__ float load_l2(const float* p) { return __ldcg(p); }
#endif

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

// float32 -> nearest float16 (ties to even) -> float32
#if defined(__HIP__) || defined(__HIPCC_RTC__)
__device__ __forceinline__ float round_f16(float x) { return (float)(_Float16)x; }
#else
__device__ __forceinline__ float round_f16(float x) {
    float r;
    asm("{ .reg .f16 h; cvt.rn.f16.f32 h, %1; cvt.f32.f16 %0, h; }" : "=f"(r) : "f"(x));
    return r;
}
#endif

// float32 -> nearest bfloat16 (ties to even) -> float32
__device__ __forceinline__ float round_bf16(float x) {
    const u32 bits = __float_as_uint(x);
    return __uint_as_float((bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int m = RF_WARP / 2; m > 0; m >>= 1) v += shfl_xor(v, m);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int m = RF_WARP / 2; m > 0; m >>= 1) v = fmaxf(v, shfl_xor(v, m));
    return v;
}

// Sum over the whole block; every thread gets the result. `scratch` holds RF_MAX_WARPS floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP;
    const int n_warps = (blockDim.x + RF_WARP - 1) / RF_WARP;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// The same in double: RMSNorm sums its squares in double, as llama.cpp (and the numpy twin) do.
__device__ __forceinline__ double block_sum_d(double v, double* scratch) {
    const int lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP;
    const int n_warps = (blockDim.x + RF_WARP - 1) / RF_WARP;
#if defined(__HIP__) || defined(__HIPCC_RTC__)
    for (int m = RF_WARP / 2; m > 0; m >>= 1) v += __shfl_xor(v, m, RF_WARP);
#else
    for (int m = RF_WARP / 2; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m, RF_WARP);
#endif
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double total = 0.0;
    for (int w = 0; w < n_warps; w++) total += scratch[w];
    return total;
}

// 1 / sqrt(mean + eps) from a double sum of squares, rounded as the numpy twin rounds it
__device__ __forceinline__ float rms_scale(double sum_squares, int n, float eps) {
    return 1.0f / sqrtf((float)(sum_squares / n) + eps);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP;
    const int n_warps = (blockDim.x + RF_WARP - 1) / RF_WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : RF_NEG_INF;
    return warp_max(v);
}
