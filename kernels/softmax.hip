// softmax.hip: y = exp(x - max) / sum, one block per row (any block size).
extern "C" __global__ void softmax(const float* x, float* y, int n) {
    __shared__ float scratch[RF_MAX_WARPS];
    const float* xr = x + (long)blockIdx.x * n;
    float* yr = y + (long)blockIdx.x * n;
    float mx = RF_NEG_INF;
    for (int i = threadIdx.x; i < n; i += blockDim.x) mx = fmaxf(mx, xr[i]);
    mx = block_max(mx, scratch);
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += expf(xr[i] - mx);
    const float inv = 1.0f / block_sum(s, scratch);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = expf(xr[i] - mx) * inv;
}
