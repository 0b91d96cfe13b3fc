// edit_rows.hip: the hook edits (ablate, patch, steer, scale a head), in place on a copy of an activation.
// x is [n, x_width]; for r < n_rows, j < n_cols:
//   x[rows[r], col0 + j] = keep * x[rows[r], col0 + j] + take * src[src_rows[r], src_col0 + j]
// keep == 0 does not read x (so -inf scores can be overwritten); a null src adds nothing.
// grid = (n_rows, ceil(n_cols / blockDim.x)).
extern "C" __global__ void edit_rows(float* x, long x_width, const int* rows, int col0, int n_cols, float keep,
                                     const float* src, long src_width, const int* src_rows, int src_col0, float take) {
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= n_cols) return;
    float* out = x + (long)rows[blockIdx.x] * x_width + col0 + j;
    float value = keep == 0.0f ? 0.0f : keep * *out;
    if (src != nullptr) value += take * src[(long)src_rows[blockIdx.x] * src_width + src_col0 + j];
    *out = value;
}
