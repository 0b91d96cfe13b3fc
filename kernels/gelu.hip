// gelu.hip: y = 0.5 x (1 + erf(x / sqrt 2)), the exact GELU that BERT uses (not the tanh approximation).
extern "C" __global__ void gelu(const float* x, float* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
}
