// attention.hip: causal attention with grouped-query heads and an optional sliding window.
// Layouts: queries [T, H, D]; key and value pools [slots, Hkv, D] (the paged KV cache), where the key
// of position p lives in slot key_slots[p]; query head h reads kv head h / (H / Hkv). Query t sits at
// positions[t] and sees keys p with p <= positions[t] and (window == 0 or positions[t] - p < window).
// Scores are scale * q.k, then softcap * tanh(score / softcap) when softcap > 0.
//
// attn_prefill: flash attention. A block holds one query per warp and walks the keys in tiles
//   of `bkv` (<= 32) kept in shared memory, with an online softmax, so any sequence length
//   fits. grid = (ceil(T / warps), H); dynamic shared memory = see attn_prefill_smem in Python.
// attn_decode: split-K flash-decode for one query per head. Each of `n_splits` blocks per head
//   reduces one slice of the visible keys to (max, sum, unnormalised output); the last block of a
//   head to finish (a ticket counter per head) merges the slices. The number of keys comes from
//   positions[0] on the device, so a captured graph replays correctly as the cache grows.

#define RF_MAX_D 256
#define RF_D_PER_LANE (RF_MAX_D / RF_WARP)

extern "C" __global__ void attn_prefill(const float* Q, const float* Kc, const float* Vc, float* O,
                                        const int* positions, const int* key_slots, int T, int H, int Hkv,
                                        int D, float scale, float softcap, int window, int bkv) {
    extern __shared__ float smem[];
    const int n_warps = blockDim.x / RF_WARP, warp = threadIdx.x / RF_WARP, lane = threadIdx.x % RF_WARP;
    float* ks = smem;                         // [bkv][D + 1]: the +1 spreads a lane's row over banks
    float* vs = ks + bkv * (D + 1);           // [bkv][D]
    float* qs = vs + bkv * D;                 // [n_warps][D]
    const int h = blockIdx.y, kvh = h / (H / Hkv);
    const int t_first = blockIdx.x * n_warps;
    const int t_last = min(T - 1, t_first + n_warps - 1);
    const int t = t_first + warp;
    const bool active = t < T;
    const int qp = active ? positions[t] : 0;
    const int hi = positions[t_last];
    const int lo = window > 0 ? max(0, positions[t_first] - window + 1) : 0;

    if (active)
        for (int d = lane; d < D; d += RF_WARP) qs[warp * D + d] = Q[((long)t * H + h) * D + d] * scale;
    float o[RF_D_PER_LANE];
    for (int i = 0; i < RF_D_PER_LANE; i++) o[i] = 0.0f;
    float m = RF_NEG_INF, l = 0.0f;

    for (int k0 = lo; k0 <= hi; k0 += bkv) {
        __syncthreads();  // the previous tile is no longer read
        for (int idx = threadIdx.x; idx < bkv * D; idx += blockDim.x) {
            const int j = idx / D, d = idx % D, key = k0 + j;
            const long src = key <= hi ? ((long)key_slots[key] * Hkv + kvh) * D + d : 0;
            ks[j * (D + 1) + d] = key <= hi ? Kc[src] : 0.0f;
            vs[j * D + d] = key <= hi ? Vc[src] : 0.0f;
        }
        __syncthreads();
        if (!active) continue;
        float s = RF_NEG_INF;
        const int key = k0 + lane;
        if (lane < bkv && key <= qp && (window == 0 || qp - key < window)) {
            s = 0.0f;
            for (int d = 0; d < D; d++) s += qs[warp * D + d] * ks[lane * (D + 1) + d];
            if (softcap > 0.0f) s = softcap * tanhf(s / softcap);
        }
        const float m_new = fmaxf(m, warp_max(s));
        if (m_new == RF_NEG_INF) continue;  // nothing visible yet in this tile or before
        const float p = s == RF_NEG_INF ? 0.0f : expf(s - m_new);
        const float corr = expf(m - m_new);  // 0 on the first visible tile (m = -inf)
        l = l * corr + warp_sum(p);
        for (int i = 0; i < RF_D_PER_LANE; i++) o[i] *= corr;
        for (int j = 0; j < bkv; j++) {
            const float pj = shfl(p, j);
            for (int i = 0; i < RF_D_PER_LANE; i++) {
                const int d = lane + i * RF_WARP;
                if (d < D) o[i] += pj * vs[j * D + d];
            }
        }
        m = m_new;
    }
    if (!active) return;
    for (int i = 0; i < RF_D_PER_LANE; i++) {
        const int d = lane + i * RF_WARP;
        if (d < D) O[((long)t * H + h) * D + d] = o[i] / l;
    }
}

// grid = (n_splits, H), block = a few warps (at most 16). Scratch: part_o [H, n_splits, D],
// part_ml [H, n_splits, 2]; tickets [H] must be zero before the first launch (the kernel resets them).
extern "C" __global__ void attn_decode(const float* q, const float* Kc, const float* Vc, const int* positions,
                                       const int* key_slots, int H, int Hkv, int D, float scale, float softcap,
                                       int window, float* part_o, float* part_ml, int* tickets, float* out) {
    __shared__ float w_m[RF_MAX_WARPS], w_l[RF_MAX_WARPS];
    __shared__ float w_o[RF_MAX_WARPS / 2][RF_MAX_D];  // at most 16 warps per block
    const int n_warps = blockDim.x / RF_WARP, warp = threadIdx.x / RF_WARP, lane = threadIdx.x % RF_WARP;
    const int split = blockIdx.x, n_splits = gridDim.x, h = blockIdx.y, kvh = h / (H / Hkv);
    const int qp = positions[0];
    const int lo = window > 0 ? max(0, qp - window + 1) : 0;
    const int per_split = (qp - lo + 1 + n_splits - 1) / n_splits;
    const int s0 = lo + split * per_split, s1 = min(qp + 1, s0 + per_split);

    float qv[RF_D_PER_LANE], o[RF_D_PER_LANE];
    for (int i = 0; i < RF_D_PER_LANE; i++) {
        const int d = lane + i * RF_WARP;
        qv[i] = d < D ? q[(long)h * D + d] * scale : 0.0f;
        o[i] = 0.0f;
    }
    float m = RF_NEG_INF, l = 0.0f;
    for (int key = s0 + warp; key < s1; key += n_warps) {
        const long slot = key_slots[key];
        const float* kr = Kc + (slot * Hkv + kvh) * D;
        const float* vr = Vc + (slot * Hkv + kvh) * D;
        float s = 0.0f;
        for (int i = 0; i < RF_D_PER_LANE; i++) {
            const int d = lane + i * RF_WARP;
            if (d < D) s += qv[i] * kr[d];
        }
        s = warp_sum(s);
        if (softcap > 0.0f) s = softcap * tanhf(s / softcap);
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new), p = expf(s - m_new);
        l = l * corr + p;
        for (int i = 0; i < RF_D_PER_LANE; i++) {
            const int d = lane + i * RF_WARP;
            o[i] = o[i] * corr + (d < D ? p * vr[d] : 0.0f);
        }
        m = m_new;
    }
    // merge the warps of this block
    if (lane == 0) { w_m[warp] = m; w_l[warp] = l; }
    __syncthreads();
    float mb = RF_NEG_INF;
    for (int w = 0; w < n_warps; w++) mb = fmaxf(mb, w_m[w]);
    const float my_scale = m == RF_NEG_INF ? 0.0f : expf(m - mb);
    for (int i = 0; i < RF_D_PER_LANE; i++) {
        const int d = lane + i * RF_WARP;
        if (d < D) w_o[warp][d] = o[i] * my_scale;
    }
    __syncthreads();
    const long part = (long)h * n_splits + split;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.0f;
        for (int w = 0; w < n_warps; w++) acc += w_o[w][d];
        part_o[part * D + d] = acc;
    }
    if (threadIdx.x == 0) {
        float lb = 0.0f;
        for (int w = 0; w < n_warps; w++) lb += w_m[w] == RF_NEG_INF ? 0.0f : w_l[w] * expf(w_m[w] - mb);
        part_ml[part * 2] = mb;
        part_ml[part * 2 + 1] = lb;
    }

    // the last block of this head to get here merges all slices
    __shared__ int is_last;
    __threadfence();  // this block's slice is visible to every block before its ticket is taken
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(&tickets[h], 1) == n_splits - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    const volatile float* ml = part_ml + (long)h * n_splits * 2;  // volatile: read what other blocks wrote
    const volatile float* po = part_o + (long)h * n_splits * D;
    float mx = RF_NEG_INF;
    for (int s = 0; s < n_splits; s++) mx = fmaxf(mx, ml[2 * s]);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float num = 0.0f, den = 0.0f;
        for (int s = 0; s < n_splits; s++) {
            if (ml[2 * s] == RF_NEG_INF) continue;  // an empty slice
            const float w = expf(ml[2 * s] - mx);
            num += w * po[s * D + d];
            den += w * ml[2 * s + 1];
        }
        out[(long)h * D + d] = num / den;
    }
    if (threadIdx.x == 0) tickets[h] = 0;  // ready for the next launch
}
