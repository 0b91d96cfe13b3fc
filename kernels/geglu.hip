// geglu.hip: the Gemma MLP gate, y = gelu_tanh(gate) * up elementwise (GELU in its tanh approximation).
extern "C" __global__ void geglu(const float* g, const float* u, float* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const float x = g[i];
        y[i] = 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x))) * u[i];
    }
}
