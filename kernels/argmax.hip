// argmax.hip: index of the largest value in each row (the first one on ties, like numpy).
// grid = rows, any block size.
__device__ __forceinline__ void better(float& v, int& i, float v2, int i2) {
    if (v2 > v || (v2 == v && i2 < i)) { v = v2; i = i2; }
}

extern "C" __global__ void argmax(const float* x, int n, int* out) {
    __shared__ float sv[RF_MAX_WARPS];
    __shared__ int si[RF_MAX_WARPS];
    const float* xr = x + (long)blockIdx.x * n;
    const int lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP;
    const int n_warps = (blockDim.x + RF_WARP - 1) / RF_WARP;
    float v = RF_NEG_INF;
    int idx = 0x7fffffff;
    for (int i = threadIdx.x; i < n; i += blockDim.x) better(v, idx, xr[i], i);
    for (int m = RF_WARP / 2; m > 0; m >>= 1) better(v, idx, shfl_xor(v, m), shfl_xor_int(idx, m));
    if (lane == 0) { sv[warp] = v; si[warp] = idx; }
    __syncthreads();
    if (warp == 0) {
        v = lane < n_warps ? sv[lane] : RF_NEG_INF;
        idx = lane < n_warps ? si[lane] : 0x7fffffff;
        for (int m = RF_WARP / 2; m > 0; m >>= 1) better(v, idx, shfl_xor(v, m), shfl_xor_int(idx, m));
        if (lane == 0) out[blockIdx.x] = idx;
    }
}
