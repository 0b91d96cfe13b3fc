// rope.hip: rotary position embedding of up to two tensors (queries and keys, one launch), each
// [tokens, heads, head_dim], written out of place. Pairs are (2i, 2i+1) in the normal (GPT-J) form
// and (i, i + n_rot/2) in the NeoX form; only the first n_rot values of a head rotate, the rest are
// copied. The angle of pair i at position p is p * inv_freq[i]; inv_freq (float64, from the host)
// already holds theta^(-2i/n_rot), the frequency factors and the linear scale. The product is
// reduced to [-pi, pi] in float64 so float32 sin/cos stay exact to rounding at any position.
// Positions come from device memory so a captured decode graph replays at any position.
// When norm_a / norm_b is non-null, each head of that tensor is first RMSNorm'd with those weights
// (Gemma's QK-norm, rms_norm.hip's arithmetic; the normalized head is written to normed_a / normed_b too,
// for whoever reads it), saving the norm's launch.
// When k_pool is non-null, tensor b holds the keys and the kernel also stores this step into the
// paged KV cache: the rotated keys into k_pool and the values v into v_pool at slots[t] (kv_store's
// job, saved a launch). grid = (tokens, heads_a + heads_b), any block size.
extern "C" __global__ void rope(const float* xa, float* ya, int heads_a, const float* xb, float* yb, int heads_b,
                                const int* positions, int head_dim, int n_rot, int neox, const double* inv_freq,
                                float* k_pool, float* v_pool, const int* slots, const float* v, int head_dim_v,
                                const float* norm_a, float* normed_a, const float* norm_b, float* normed_b, float eps) {
    __shared__ double scratch[RF_MAX_WARPS];
    const int t = blockIdx.x, h = blockIdx.y, hb = h - heads_a;
    const long base = h < heads_a ? ((long)t * heads_a + h) * head_dim : ((long)t * heads_b + hb) * head_dim;
    const float* x = (h < heads_a ? xa : xb) + base;
    float* y = (h < heads_a ? ya : yb) + base;
    const float* norm = h < heads_a ? norm_a : norm_b;
    float scale = 1.0f;
    if (norm) {  // the same for the whole block
        double ss = 0.0;
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) ss += (double)x[d] * x[d];
        scale = rms_scale(block_sum_d(ss, scratch), head_dim, eps);
        float* normed = (h < heads_a ? normed_a : normed_b) + base;
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) normed[d] = x[d] * scale * norm[d];
    }
    const int half = n_rot / 2;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const double angle = (double)positions[t] * inv_freq[i];
        const float r = (float)(angle - 6.283185307179586 * rint(angle * 0.15915494309189535));
        float s, c;
        sincosf(r, &s, &c);
        const int i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
        const float x0 = norm ? x[i0] * scale * norm[i0] : x[i0], x1 = norm ? x[i1] * scale * norm[i1] : x[i1];
        y[i0] = x0 * c - x1 * s;
        y[i1] = x0 * s + x1 * c;
    }
    for (int d = n_rot + threadIdx.x; d < head_dim; d += blockDim.x) y[d] = norm ? x[d] * scale * norm[d] : x[d];
    if (k_pool == 0 || h < heads_a) return;
    __syncthreads();  // this block's rotated key row is complete
    const long slot = slots[t];
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) k_pool[(slot * heads_b + hb) * head_dim + d] = y[d];
    for (int d = threadIdx.x; d < head_dim_v; d += blockDim.x)
        v_pool[(slot * heads_b + hb) * head_dim_v + d] = v[((long)t * heads_b + hb) * head_dim_v + d];
}
