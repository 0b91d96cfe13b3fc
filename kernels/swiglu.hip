// swiglu.hip: the Llama MLP gate, y = silu(gate) * up elementwise.
extern "C" __global__ void swiglu(const float* g, const float* u, float* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}
