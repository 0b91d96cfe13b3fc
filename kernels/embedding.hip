// embedding.hip: gather rows of a (possibly quantized) embedding table and decode them to float,
// times `scale` (Gemma multiplies embeddings by sqrt(hidden)). grid = tokens, any block size.
#include "quant.h"

template <int T>
__device__ void embed(const u8* table, long row_bytes, const int* ids, float* out, int K, float scale) {
    const u8* row = table + (long)ids[blockIdx.x] * row_bytes;
    float* o = out + (long)blockIdx.x * K;
    for (int k = threadIdx.x * 8; k < K; k += blockDim.x * 8) {
        float v[8];
        dequant8<T>(row, k, v);
        for (int i = 0; i < 8; i++) o[k + i] = v[i] * scale;
    }
}

#define RF_EMBED_KERNEL(name, T)                                                                     \
    extern "C" __global__ void embed_##name(const u8* table, long row_bytes, const int* ids, float* out, \
                                            int K, float scale) {                                    \
        embed<T>(table, row_bytes, ids, out, K, scale);                                              \
    }
RF_FOR_EACH_TYPE(RF_EMBED_KERNEL)
