// softcap.hip: y = cap * tanh(x / cap) elementwise (Gemma's logit soft-capping).
extern "C" __global__ void softcap(const float* x, float* y, float cap, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = cap * tanhf(x[i] / cap);
}
