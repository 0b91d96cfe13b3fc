// encoder_attention.hip: bidirectional attention over packed sequences (BERT): out = softmax(q kᵀ * scale) v
// per sequence and head. Rows are tokens ([n_tokens, heads * DH]); offsets[s]..offsets[s+1] is sequence s.
// Grid: (sequence, head, block of queries), 64 threads a block; one thread per query. The block walks its
// sequence's keys and values in tiles staged in shared memory (every thread reads the same key: a broadcast),
// keeping a running max and sum (online softmax), so any sequence length fits in fixed shared memory.
#define TILE 64

template <int DH>
__device__ void encoder_attention_impl(const float* q, const float* k, const float* v, const int* offsets,
                                       int n_heads, float scale, float* out) {
    __shared__ float ks[TILE][DH];
    __shared__ float vs[TILE][DH];
    const int seq = blockIdx.x, head = blockIdx.y;
    const int start = offsets[seq], len = offsets[seq + 1] - start;
    const int width = n_heads * DH;
    const int query = blockIdx.z * blockDim.x + threadIdx.x;
    if ((int)(blockIdx.z * blockDim.x) >= len) return;  // the whole block is past this sequence (uniform)
    const bool active = query < len;
    float qv[DH], acc[DH];
    const float* qrow = q + (long)(start + (active ? query : 0)) * width + head * DH;
    #pragma unroll
    for (int d = 0; d < DH; d++) {
        qv[d] = qrow[d] * scale;
        acc[d] = 0.0f;
    }
    float running_max = RF_NEG_INF, total = 0.0f;
    for (int k0 = 0; k0 < len; k0 += TILE) {
        const int n_keys = min(TILE, len - k0);
        __syncthreads();  // the previous tile is no longer read
        for (int i = threadIdx.x; i < n_keys * DH; i += blockDim.x) {
            const int key = i / DH, d = i % DH;
            const long row = (long)(start + k0 + key) * width + head * DH + d;
            ks[key][d] = k[row];
            vs[key][d] = v[row];
        }
        __syncthreads();
        for (int key = 0; key < n_keys; key++) {
            float score = 0.0f;
            #pragma unroll
            for (int d = 0; d < DH; d++) score += qv[d] * ks[key][d];
            if (score > running_max) {  // rescale what was summed under the old maximum
                const float shrink = expf(running_max - score);
                total *= shrink;
                #pragma unroll
                for (int d = 0; d < DH; d++) acc[d] *= shrink;
                running_max = score;
            }
            const float p = expf(score - running_max);
            total += p;
            #pragma unroll
            for (int d = 0; d < DH; d++) acc[d] += p * vs[key][d];
        }
    }
    if (!active) return;
    float* orow = out + (long)(start + query) * width + head * DH;
    const float inv = 1.0f / total;
    #pragma unroll
    for (int d = 0; d < DH; d++) orow[d] = acc[d] * inv;
}

#define RF_ENCODER_ATTENTION(DH)                                                                              \
    extern "C" __global__ void RF_AMD_MAX_THREADS(64) encoder_attention_##DH(                                 \
        const float* q, const float* k, const float* v, const int* offsets, int n_heads, float scale, float* out) { \
        encoder_attention_impl<DH>(q, k, v, offsets, n_heads, scale, out);                                     \
    }
RF_ENCODER_ATTENTION(32)
RF_ENCODER_ATTENTION(64)
