// sample.hip: top-k / top-p (nucleus) sampling of one token, on the device.
// The k most likely tokens (k <= 256; top_k = 0 means 256) are found in order by k passes of
// "largest value below the previous one" (ties broken by lower index); they are softmaxed at
// `temperature`, cut to the shortest prefix whose mass reaches top_p, and one is drawn with the
// uniform number u[0] in [0, 1) read from device memory (so a captured graph can replay it).
// One block of any size; writes out[0].
#define RF_SAMPLE_MAX_K 256

extern "C" __global__ void sample_top_k_top_p(const float* logits, int n, int top_k, float top_p,
                                              float temperature, const float* u, int* out) {
    __shared__ float cand_v[RF_SAMPLE_MAX_K];
    __shared__ int cand_i[RF_SAMPLE_MAX_K];
    __shared__ float sv[RF_MAX_WARPS];
    __shared__ int si[RF_MAX_WARPS];
    const int lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP;
    const int n_warps = (blockDim.x + RF_WARP - 1) / RF_WARP;
    const int k = min(n, (top_k <= 0 || top_k > RF_SAMPLE_MAX_K) ? RF_SAMPLE_MAX_K : top_k);
    float prev_v = __int_as_float(0x7f800000);  // +inf
    int prev_i = -1;
    for (int c = 0; c < k; c++) {
        float v = RF_NEG_INF;
        int idx = 0x7fffffff;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const float x = logits[i];
            const bool after_prev = x < prev_v || (x == prev_v && i > prev_i);
            if (after_prev && (x > v || (x == v && i < idx))) { v = x; idx = i; }
        }
        for (int m = RF_WARP / 2; m > 0; m >>= 1) {
            const float v2 = shfl_xor(v, m);
            const int i2 = shfl_xor_int(idx, m);
            if (v2 > v || (v2 == v && i2 < idx)) { v = v2; idx = i2; }
        }
        __syncthreads();
        if (lane == 0) { sv[warp] = v; si[warp] = idx; }
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int w = 1; w < n_warps; w++)
                if (sv[w] > v || (sv[w] == v && si[w] < idx)) { v = sv[w]; idx = si[w]; }
            cand_v[c] = v;
            cand_i[c] = idx;
        }
        __syncthreads();
        prev_v = cand_v[c];
        prev_i = cand_i[c];
    }
    if (threadIdx.x == 0) {
        // candidates are sorted, so the nucleus is a prefix
        float total = 0.0f;
        for (int c = 0; c < k; c++) total += expf((cand_v[c] - cand_v[0]) / temperature);
        int keep = k;
        float mass = 0.0f;
        for (int c = 0; c < k; c++) {
            mass += expf((cand_v[c] - cand_v[0]) / temperature) / total;
            if (mass >= top_p) { keep = c + 1; break; }
        }
        float kept = 0.0f;
        for (int c = 0; c < keep; c++) kept += expf((cand_v[c] - cand_v[0]) / temperature);
        const float target = u[0] * kept;
        float run = 0.0f;
        int chosen = cand_i[keep - 1];
        for (int c = 0; c < keep; c++) {
            run += expf((cand_v[c] - cand_v[0]) / temperature);
            if (target < run) { chosen = cand_i[c]; break; }
        }
        out[0] = chosen;
    }
}
