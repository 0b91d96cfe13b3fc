// take_rows.hip: gather rows, y[i] = x[rows[i]] for rows of `width` floats. grid = len(rows).
extern "C" __global__ void take_rows(const float* x, const int* rows, float* y, int width) {
    const float* src = x + (long)rows[blockIdx.x] * width;
    float* dst = y + (long)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = src[i];
}
