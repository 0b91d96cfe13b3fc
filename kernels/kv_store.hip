// kv_store.hip: write a batch's keys and values (one row of `row` floats per token) into the
// layer's paged cache pools at the tokens' slots. grid = tokens, any block size.
extern "C" __global__ void kv_store(const float* k, const float* v, float* k_pool, float* v_pool,
                                    const int* slots, int row_k, int row_v) {
    const int t = blockIdx.x;
    const long slot = slots[t];
    for (int i = threadIdx.x; i < row_k; i += blockDim.x) k_pool[slot * row_k + i] = k[(long)t * row_k + i];
    for (int i = threadIdx.x; i < row_v; i += blockDim.x) v_pool[slot * row_v + i] = v[(long)t * row_v + i];
}
