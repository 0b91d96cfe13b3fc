// layer_norm.hip: y = (x - mean) / sqrt(var + eps) * w + b, one block per row (any block size).
// Two passes over the row (mean, then squared deviations) as the numpy twin does: one-pass E[x²] - mean²
// loses digits when the mean is large next to the spread.
extern "C" __global__ void layer_norm(const float* x, const float* w, const float* b, float* y, int n, float eps) {
    __shared__ float scratch[RF_MAX_WARPS];
    const float* xr = x + (long)blockIdx.x * n;
    float* yr = y + (long)blockIdx.x * n;
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += xr[i];
    const float mean = block_sum(s, scratch) / n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float d = xr[i] - mean;
        ss += d * d;
    }
    const float inv = 1.0f / sqrtf(block_sum(ss, scratch) / n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = (xr[i] - mean) * inv * w[i] + b[i];
}
