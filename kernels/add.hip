// add.hip: y = a + b elementwise, where b may be shorter and repeat along rows (a bias vector):
// y[i] = a[i] + b[i % nb]. y may alias a.
extern "C" __global__ void add(const float* a, const float* b, float* y, long n, long nb) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = a[i] + b[i % nb];
}
