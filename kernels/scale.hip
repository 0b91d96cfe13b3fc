// scale.hip: y = x * factor elementwise (Gemma's sqrt(d_model) embedding scale).
extern "C" __global__ void scale(const float* x, float* y, float factor, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = x[i] * factor;
}
