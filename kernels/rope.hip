// rope.hip: rotary position embedding of x [tokens, heads, head_dim] into y (same shape).
// Pairs are (2i, 2i+1) in the normal (GPT-J) form and (i, i + n_rot/2) in the NeoX form; only the
// first n_rot values of a head rotate, the rest are copied. The angle of pair i at position p is
// p * freq_scale * theta^(-2i/n_rot) / freq_factors[i] (freq_factors may be null: llama3 scaling).
// Positions come from device memory so a captured decode graph replays at any position.
// grid = (tokens, heads), any block size.
extern "C" __global__ void rope(const float* x, float* y, const int* positions, int heads, int head_dim,
                                int n_rot, float theta, int neox, const float* freq_factors, float freq_scale) {
    const long base = ((long)blockIdx.x * heads + blockIdx.y) * head_dim;
    const float* xh = x + base;
    float* yh = y + base;
    const int half = n_rot / 2;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        // double keeps the angle exact to float rounding at positions in the tens of thousands
        double angle = (double)positions[blockIdx.x] * freq_scale * pow((double)theta, -2.0 * i / n_rot);
        if (freq_factors) angle /= (double)freq_factors[i];
        const float c = (float)cos(angle), s = (float)sin(angle);
        const int i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
        const float x0 = xh[i0], x1 = xh[i1];
        yh[i0] = x0 * c - x1 * s;
        yh[i1] = x0 * s + x1 * c;
    }
    for (int d = n_rot + threadIdx.x; d < head_dim; d += blockDim.x) yh[d] = xh[d];
}
