// rms_norm.hip: y = x / sqrt(mean(x²) + eps) * w, one block per row (any block size). When `add` is non-null
// the residual add behind it is done too: sum = y + add (Gemma's post-norms), saving the add's launch.
extern "C" __global__ void rms_norm(const float* x, const float* w, float* y, int n, float eps, const float* add,
                                    float* sum) {
    __shared__ double scratch[RF_MAX_WARPS];
    const float* xr = x + (long)blockIdx.x * n;
    float* yr = y + (long)blockIdx.x * n;
    double ss = 0.0;  // squares summed in double, as llama.cpp does
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += (double)xr[i] * xr[i];
    const float inv = rms_scale(block_sum_d(ss, scratch), n, eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = xr[i] * inv * w[i];
        yr[i] = v;
        if (add) sum[(long)blockIdx.x * n + i] = v + add[(long)blockIdx.x * n + i];
    }
}
