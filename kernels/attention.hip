// attention.hip: causal attention with grouped-query heads, an optional sliding window and soft-capping.
// Layouts: queries [T, H, D]; key and value pools [slots, Hkv, D] (the paged KV cache), where the key
// of position p lives in slot key_slots[p]; query head h reads kv head h / (H / Hkv). Query t sits at
// positions[t] and sees keys p with p <= positions[t] and (window == 0 or positions[t] - p < window).
// Scores are scale * q.k, then softcap * tanh(score / softcap) when softcap > 0.
//
// Both kernels walk the keys in tiles of up to 32: lane j scores key j of the tile (a whole dot
// product), the warp takes the tile's max and sum (online softmax, so any length fits), and then the
// lanes switch to owning output dimensions and accumulate p_j * v_j. The head width D is a template
// parameter (64, 128, 256 have their own kernels; *_any takes any D <= 256 at run time).
//
// attn_prefill: one query per warp, a block's queries share each key/value tile in shared memory.
//   grid = (ceil(T / warps), H), block = 256 threads, dynamic shared memory: see the host.
// attn_decode: split-K flash-decode of one query per head. Each of the n_splits blocks of a head
//   reduces a slice of the visible keys to (max, sum, unnormalised output); the last block of the
//   head to finish (a ticket counter per head) merges the slices. The number of keys comes from
//   positions[0] on the device, so a captured graph replays correctly as the cache grows.
//   grid = (n_splits, H), block = up to 256 threads and 8 warps.

#define RF_TILE 32

__device__ __forceinline__ bool visible(int key, int qp, int window) {
    return key <= qp && (window == 0 || qp - key < window);
}

__device__ __forceinline__ float capped(float s, float softcap) {
    return softcap > 0.0f ? softcap * tanhf(s / softcap) : s;
}

// One tile step of the online softmax for a warp: lane j holds score s of key j (or -inf).
// Returns p_j (this lane's key weight); o[] are this lane's output dims (d = lane + i * RF_WARP).
template <int DMAX>
__device__ __forceinline__ float online_update(float s, float& m, float& l, float* o) {
    const float m_new = fmaxf(m, warp_max(s));
    if (m_new == RF_NEG_INF) return 0.0f;  // nothing visible yet
    const float p = s == RF_NEG_INF ? 0.0f : expf(s - m_new);
    const float corr = expf(m - m_new);  // 0 on the first visible tile (m = -inf)
    l = l * corr + warp_sum(p);
    for (int i = 0; i < DMAX / RF_WARP + (DMAX % RF_WARP != 0); i++) o[i] *= corr;
    m = m_new;
    return p;
}

// EXACT: D == DMAX, known to the compiler (loops unrolled, no bounds checks); else any D <= DMAX.
template <int DMAX, bool EXACT>
__device__ void prefill(const float* Q, const float* Kc, const float* Vc, float* O, const int* positions,
                        const int* key_slots, int T, int H, int Hkv, int D_arg, float scale, float softcap, int window,
                        int bkv) {
    constexpr int PER_LANE = (DMAX + RF_WARP - 1) / RF_WARP;
    const int D = EXACT ? DMAX : D_arg;
    extern __shared__ float smem[];
    const int n_warps = blockDim.x / RF_WARP, warp = threadIdx.x / RF_WARP, lane = threadIdx.x % RF_WARP;
    float* ks = smem;                   // [bkv][D + 1]: the +1 spreads a lane's row over the banks
    float* vs = ks + bkv * (D + 1);     // [bkv][D]
    float* qs = vs + bkv * D;           // [n_warps][D]
    const int h = blockIdx.y, kvh = h / (H / Hkv);
    const int t_first = blockIdx.x * n_warps, t_last = min(T - 1, t_first + n_warps - 1);
    const int t = t_first + warp;
    const bool active = t < T;
    const int qp = active ? positions[t] : 0;
    const int hi = positions[t_last];
    const int lo = window > 0 ? max(0, positions[t_first] - window + 1) : 0;
    if (active)
        for (int d = lane; d < D; d += RF_WARP) qs[warp * D + d] = Q[((long)t * H + h) * D + d] * scale;
    float o[PER_LANE];
    for (int i = 0; i < PER_LANE; i++) o[i] = 0.0f;
    float m = RF_NEG_INF, l = 0.0f;
    const int quads = D / 4;
    for (int k0 = lo; k0 <= hi; k0 += bkv) {
        __syncthreads();  // the previous tile is no longer read
        for (int idx = threadIdx.x; idx < bkv * quads; idx += blockDim.x) {
            const int j = idx / quads, d = (idx % quads) * 4, key = k0 + j;
            float4 kv = make_float4(0.0f, 0.0f, 0.0f, 0.0f), vv = kv;
            if (key <= hi) {
                const long src = ((long)key_slots[key] * Hkv + kvh) * D + d;
                kv = *(const float4*)(Kc + src);
                vv = *(const float4*)(Vc + src);
            }
            float* kd = ks + j * (D + 1) + d;
            kd[0] = kv.x; kd[1] = kv.y; kd[2] = kv.z; kd[3] = kv.w;
            *(float4*)(vs + j * D + d) = vv;
        }
        __syncthreads();
        if (!active) continue;
        float s = RF_NEG_INF;
        if (lane < bkv && visible(k0 + lane, qp, window)) {
            s = 0.0f;
            const float* kr = ks + lane * (D + 1);
            const float* qr = qs + warp * D;
            #pragma unroll 8
            for (int d = 0; d < D; d++) s += qr[d] * kr[d];
            s = capped(s, softcap);
        }
        const float p = online_update<DMAX>(s, m, l, o);
        if (m == RF_NEG_INF) continue;
        for (int j = 0; j < bkv; j++) {
            const float pj = shfl(p, j);
            #pragma unroll
            for (int i = 0; i < PER_LANE; i++) {
                const int d = lane + i * RF_WARP;
                if (d < D) o[i] += pj * vs[j * D + d];
            }
        }
    }
    if (!active) return;
    for (int i = 0; i < PER_LANE; i++) {
        const int d = lane + i * RF_WARP;
        if (d < D) O[((long)t * H + h) * D + d] = o[i] / l;
    }
}

template <int DMAX, bool EXACT>
__device__ void decode(const float* q, const float* Kc, const float* Vc, const int* positions, const int* key_slots,
                       int H, int Hkv, int D_arg, float scale, float softcap, int window, float* part_o, float* part_ml,
                       int* tickets, float* out) {
    constexpr int PER_LANE = (DMAX + RF_WARP - 1) / RF_WARP;
    const int D = EXACT ? DMAX : D_arg;
    __shared__ float qs[DMAX];
    __shared__ float w_m[RF_MAX_WARPS], w_l[RF_MAX_WARPS];
    __shared__ float w_o[8][DMAX];  // launched with at most 8 warps
    __shared__ int is_last;
    const int n_warps = blockDim.x / RF_WARP, warp = threadIdx.x / RF_WARP, lane = threadIdx.x % RF_WARP;
    const int split = blockIdx.x, n_splits = gridDim.x, h = blockIdx.y, kvh = h / (H / Hkv);
    const int qp = positions[0];
    const int lo = window > 0 ? max(0, qp - window + 1) : 0;
    const int per_split = (qp - lo + 1 + n_splits - 1) / n_splits;
    const int s0 = lo + split * per_split, s1 = min(qp + 1, s0 + per_split);

    float o[PER_LANE];
    for (int i = 0; i < PER_LANE; i++) o[i] = 0.0f;
    float m = RF_NEG_INF, l = 0.0f;
    int k0 = s0 + warp * RF_TILE;
    // the first tile's slot is read before the query is staged: the two loads overlap
    int slot = k0 < s1 ? key_slots[k0 + min(lane % RF_TILE, min(RF_TILE, s1 - k0) - 1)] : 0;
    for (int d = threadIdx.x; d < D; d += blockDim.x) qs[d] = q[(long)h * D + d] * scale;
    __syncthreads();
    for (; k0 < s1; k0 += n_warps * RF_TILE) {
        // Loads are never skipped, only clamped to the tile's last key and weighted 0: a branch around
        // them would keep the compiler from putting a whole tile's loads in flight at once.
        const int n_keys = min(RF_TILE, s1 - k0);
        if (k0 != s0 + warp * RF_TILE) slot = key_slots[k0 + min(lane % RF_TILE, n_keys - 1)];
        const long row = ((long)slot * Hkv + kvh) * D;
        float s = 0.0f;
        for (int d = 0; d < D; d += 4) {
            const float4 kk = *(const float4*)(Kc + row + d);
            s += qs[d] * kk.x + qs[d + 1] * kk.y + qs[d + 2] * kk.z + qs[d + 3] * kk.w;
        }
        s = lane < n_keys ? capped(s, softcap) : RF_NEG_INF;
        const float p = online_update<DMAX>(s, m, l, o);
        constexpr int UNROLL = PER_LANE <= 2 ? RF_TILE : PER_LANE <= 4 ? 16 : 8;
        for (int j0 = 0; j0 < n_keys; j0 += UNROLL) {
            #pragma unroll
            for (int jj = 0; jj < UNROLL; jj++) {
                const int j = j0 + jj;  // past n_keys: p is 0 there and the slot is the last key's
                const float pj = shfl(p, j);
                const long vrow = ((long)shfl_int(slot, j) * Hkv + kvh) * D;
                #pragma unroll
                for (int i = 0; i < PER_LANE; i++) {
                    const int d = lane + i * RF_WARP;
                    if (d < D) o[i] += pj * Vc[vrow + d];
                }
            }
        }
    }
    // merge the warps of this block into one slice
    if (lane == 0) { w_m[warp] = m; w_l[warp] = l; }
    __syncthreads();
    float mb = RF_NEG_INF;
    for (int w = 0; w < n_warps; w++) mb = fmaxf(mb, w_m[w]);
    const float mine_scale = m == RF_NEG_INF ? 0.0f : expf(m - mb);
    for (int i = 0; i < PER_LANE; i++) {
        const int d = lane + i * RF_WARP;
        if (d < D) w_o[warp][d] = o[i] * mine_scale;
    }
    __syncthreads();
    float lb = 0.0f;
    for (int w = 0; w < n_warps; w++) lb += w_m[w] == RF_NEG_INF ? 0.0f : w_l[w] * expf(w_m[w] - mb);
    const long part = (long)h * n_splits + split;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.0f;
        for (int w = 0; w < n_warps; w++) acc += w_o[w][d];
        part_o[part * D + d] = acc;
    }
    if (threadIdx.x == 0) {
        part_ml[part * 2] = mb;
        part_ml[part * 2 + 1] = lb;
    }

    // the last block of this head to get here merges all slices
    __threadfence();  // this block's slice is visible to every block before its ticket is taken
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(&tickets[h], 1) == n_splits - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    // lane s of warp 0 weighs slice s (n_splits <= RF_WARP); then every output dimension reads all its slices
    // at once. (Reading the slices one after another, each weight waiting on its own load, took several µs.)
    const float* ml = part_ml + (long)h * n_splits * 2;
    const float* po = part_o + (long)h * n_splits * D;
    if (warp == 0) {
        const float ms = lane < n_splits ? load_l2(ml + 2 * lane) : RF_NEG_INF;
        const float ls = lane < n_splits ? load_l2(ml + 2 * lane + 1) : 0.0f;
        const float mx = warp_max(ms);
        const float w = ms == RF_NEG_INF ? 0.0f : expf(ms - mx);  // an empty slice weighs nothing
        const float den = warp_sum(w * ls);
        if (lane < n_splits) w_m[lane] = w;
        if (lane == 0) w_l[0] = den;
    }
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float num = 0.0f;
        #pragma unroll 8
        for (int s = 0; s < n_splits; s++) num += w_m[s] * load_l2(po + s * D + d);
        out[(long)h * D + d] = num / w_l[0];
    }
    if (threadIdx.x == 0) tickets[h] = 0;  // ready for the next launch
}

#define RF_ATTENTION_KERNELS(suffix, DMAX, EXACT)                                                                        \
    extern "C" __global__ void __launch_bounds__(256) attn_prefill_##suffix(                                        \
        const float* Q, const float* Kc, const float* Vc, float* O, const int* positions, const int* key_slots,      \
        int T, int H, int Hkv, int D, float scale, float softcap, int window, int bkv) {                             \
        prefill<DMAX, EXACT>(Q, Kc, Vc, O, positions, key_slots, T, H, Hkv, D, scale, softcap, window, bkv);              \
    }                                                                                                               \
    extern "C" __global__ void RF_AMD_MAX_THREADS(256) attn_decode_##suffix(                                      \
        const float* q, const float* Kc, const float* Vc, const int* positions, const int* key_slots, int H, int Hkv, \
        int D, float scale, float softcap, int window, float* part_o, float* part_ml, int* tickets, float* out) {    \
        decode<DMAX, EXACT>(q, Kc, Vc, positions, key_slots, H, Hkv, D, scale, softcap, window, part_o, part_ml, tickets, \
                     out);                                                                                          \
    }
RF_ATTENTION_KERNELS(d64, 64, true)
RF_ATTENTION_KERNELS(d128, 128, true)
RF_ATTENTION_KERNELS(d256, 256, true)
RF_ATTENTION_KERNELS(any, 256, false)

// The hooked path: scores and pattern materialized for one sequence, so hooks can read and edit them on the
// device (the fused kernels above never write them). Twins: attention_scores / attention_mix in ops/attention.py.
// attn_scores: out [H, T, L] = scale * q[t, h] . K[key_slots[l], h / (H / Hkv)], capped, masked to -inf.
//   grid = (ceil(L / blockDim.x), T, H); the block's query row sits in shared memory (D <= 256).
extern "C" __global__ void attn_scores(const float* q, const float* Kc, const int* key_slots, const int* positions,
                                       float* out, int T, int L, int H, int Hkv, int D, float scale, float softcap,
                                       int window) {
    __shared__ float qs[256];
    const int t = blockIdx.y, h = blockIdx.z, kvh = h / (H / Hkv);
    for (int d = threadIdx.x; d < D; d += blockDim.x) qs[d] = q[((long)t * H + h) * D + d];
    __syncthreads();
    const int l = blockIdx.x * blockDim.x + threadIdx.x;
    if (l >= L) return;
    float s = RF_NEG_INF;
    if (visible(l, positions[t], window)) {
        const float* k = Kc + ((long)key_slots[l] * Hkv + kvh) * D;
        float dot = 0.0f;
        for (int d = 0; d < D; d++) dot += qs[d] * k[d];
        s = capped(dot * scale, softcap);
    }
    out[((long)h * T + t) * L + l] = s;
}

// attn_mix: z [T, H, D] = sum_l pattern[h, t, l] * V[key_slots[l], h / (H / Hkv)]. grid = (T, H), a thread per d.
extern "C" __global__ void attn_mix(const float* pattern, const float* Vc, const int* key_slots, float* z, int T,
                                    int L, int H, int Hkv, int D) {
    const int t = blockIdx.x, h = blockIdx.y, kvh = h / (H / Hkv);
    const float* p = pattern + ((long)h * T + t) * L;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.0f;
        for (int l = 0; l < L; l++) acc += p[l] * Vc[((long)key_slots[l] * Hkv + kvh) * D + d];
        z[((long)t * H + h) * D + d] = acc;
    }
}

// attn_decode_rows: one decode query per sequence for a whole batch of sequences in one launch (a batched
// decode step). Row b's query is Q[b] at positions[b]; its key at position p lives in slot
// tables[b * max_blocks + p / block_size] * block_size + p % block_size (the paged cache's block table).
// The keys are split at fixed multiples of RF_SPLIT counted from position 0 — a fixed split size, not a
// number of splits — so a row's arithmetic depends on its own length only, never on the batch around it or on
// which block computes which slice (batch invariance). Block x of (row, head) takes slices x, x + gridDim.x, ...
// of that row; the block that finishes a row's last slice merges the slices in split order.
// grid = (blocks per row and head, H, rows), block = 64 threads (launched with at most 8 warps).
#define RF_SPLIT 64

__device__ __forceinline__ int paged_slot(const int* table, int block_size, int p) {
    return table[p / block_size] * block_size + p % block_size;
}

template <int DMAX, bool EXACT>
__device__ void decode_rows(const float* Q, const float* Kc, const float* Vc, const int* positions, const int* tables,
                            int max_blocks, int block_size, int H, int Hkv, int D_arg, float scale, float softcap,
                            int window, int max_splits, float* part_o, float* part_ml, int* tickets, float* out) {
    constexpr int PER_LANE = (DMAX + RF_WARP - 1) / RF_WARP;
    const int D = EXACT ? DMAX : D_arg;
    __shared__ float qs[DMAX];
    __shared__ float w_m[RF_MAX_WARPS], w_l[RF_MAX_WARPS];
    __shared__ float w_o[8][DMAX];  // launched with at most 8 warps
    __shared__ int is_last;
    const int n_warps = blockDim.x / RF_WARP, warp = threadIdx.x / RF_WARP, lane = threadIdx.x % RF_WARP;
    const int h = blockIdx.y, b = blockIdx.z, kvh = h / (H / Hkv);
    const int qp = positions[b];
    const int lo = window > 0 ? max(0, qp - window + 1) : 0;
    const int first_split = lo / RF_SPLIT, last_split = qp / RF_SPLIT;
    if (first_split + (int)blockIdx.x > last_split) return;
    const int* table = tables + (long)b * max_blocks;
    const long head = (long)b * H + h;
    for (int d = threadIdx.x; d < D; d += blockDim.x) qs[d] = Q[head * D + d] * scale;
    __syncthreads();

    for (int split = first_split + blockIdx.x; split <= last_split; split += gridDim.x) {
        const int s0 = max(lo, split * RF_SPLIT), s1 = min(qp + 1, (split + 1) * RF_SPLIT);
        float o[PER_LANE];
        #pragma unroll
        for (int i = 0; i < PER_LANE; i++) o[i] = 0.0f;
        float m = RF_NEG_INF, l = 0.0f;
        int k0 = s0 + warp * RF_TILE;
        int slot = k0 < s1 ? paged_slot(table, block_size, k0 + min(lane % RF_TILE, min(RF_TILE, s1 - k0) - 1)) : 0;
        for (; k0 < s1; k0 += n_warps * RF_TILE) {
            const int n_keys = min(RF_TILE, s1 - k0);  // loads clamped to the tile's last key, weighted 0 (as decode)
            if (k0 != s0 + warp * RF_TILE) slot = paged_slot(table, block_size, k0 + min(lane % RF_TILE, n_keys - 1));
            const long row = ((long)slot * Hkv + kvh) * D;
            float s = 0.0f;
            for (int d = 0; d < D; d += 4) {
                const float4 kk = *(const float4*)(Kc + row + d);
                s += qs[d] * kk.x + qs[d + 1] * kk.y + qs[d + 2] * kk.z + qs[d + 3] * kk.w;
            }
            s = lane < n_keys ? capped(s, softcap) : RF_NEG_INF;
            const float p = online_update<DMAX>(s, m, l, o);
            constexpr int UNROLL = PER_LANE <= 2 ? RF_TILE : PER_LANE <= 4 ? 16 : 8;
            for (int j0 = 0; j0 < n_keys; j0 += UNROLL) {
                #pragma unroll
                for (int jj = 0; jj < UNROLL; jj++) {
                    const int j = j0 + jj;
                    const float pj = shfl(p, j);
                    const long vrow = ((long)shfl_int(slot, j) * Hkv + kvh) * D;
                    #pragma unroll
                    for (int i = 0; i < PER_LANE; i++) {
                        const int d = lane + i * RF_WARP;
                        if (d < D) o[i] += pj * Vc[vrow + d];
                    }
                }
            }
        }
        // the warps of this block -> one slice (max, sum, unnormalised output)
        if (lane == 0) { w_m[warp] = m; w_l[warp] = l; }
        __syncthreads();
        float mb = RF_NEG_INF;
        for (int w = 0; w < n_warps; w++) mb = fmaxf(mb, w_m[w]);
        const float mine_scale = m == RF_NEG_INF ? 0.0f : expf(m - mb);
        #pragma unroll
        for (int i = 0; i < PER_LANE; i++) {
            const int d = lane + i * RF_WARP;
            if (d < D) w_o[warp][d] = o[i] * mine_scale;
        }
        __syncthreads();
        float lb = 0.0f;
        for (int w = 0; w < n_warps; w++) lb += w_m[w] == RF_NEG_INF ? 0.0f : w_l[w] * expf(w_m[w] - mb);
        if (first_split == last_split) {  // one slice: it is the answer
            for (int d = threadIdx.x; d < D; d += blockDim.x) {
                float acc = 0.0f;
                for (int w = 0; w < n_warps; w++) acc += w_o[w][d];
                out[head * D + d] = acc / lb;
            }
            return;
        }
        const long part = head * max_splits + split;
        for (int d = threadIdx.x; d < D; d += blockDim.x) {
            float acc = 0.0f;
            for (int w = 0; w < n_warps; w++) acc += w_o[w][d];
            part_o[part * D + d] = acc;
        }
        if (threadIdx.x == 0) {
            part_ml[part * 2] = mb;
            part_ml[part * 2 + 1] = lb;
        }
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) is_last = atomicAdd(&tickets[head], 1) == last_split - first_split;
        __syncthreads();
        if (is_last) {
            __threadfence();
            // every thread walks the slices in split order
            const float* ml = part_ml + head * max_splits * 2;
            const float* po = part_o + head * max_splits * D;
            float mx = RF_NEG_INF;
            for (int s = first_split; s <= last_split; s++) mx = fmaxf(mx, load_l2(ml + 2 * s));
            float den = 0.0f;
            for (int s = first_split; s <= last_split; s++) {
                const float ms = load_l2(ml + 2 * s);
                den += ms == RF_NEG_INF ? 0.0f : expf(ms - mx) * load_l2(ml + 2 * s + 1);
            }
            for (int d = threadIdx.x; d < D; d += blockDim.x) {
                float num = 0.0f;
                for (int s = first_split; s <= last_split; s++) {
                    const float ms = load_l2(ml + 2 * s);
                    num += ms == RF_NEG_INF ? 0.0f : expf(ms - mx) * load_l2(po + s * D + d);
                }
                out[head * D + d] = num / den;
            }
            if (threadIdx.x == 0) tickets[head] = 0;  // ready for the next launch
        }
        __syncthreads();  // w_m, w_o and is_last are reused by this block's next slice
    }
}

#define RF_ATTENTION_ROWS_KERNELS(suffix, DMAX, EXACT)                                                          \
    extern "C" __global__ void RF_AMD_MAX_THREADS(256) attn_decode_rows_##suffix(                                \
        const float* Q, const float* Kc, const float* Vc, const int* positions, const int* tables, int max_blocks, \
        int block_size, int H, int Hkv, int D, float scale, float softcap, int window, int max_splits,          \
        float* part_o, float* part_ml, int* tickets, float* out) {                                            \
        decode_rows<DMAX, EXACT>(Q, Kc, Vc, positions, tables, max_blocks, block_size, H, Hkv, D, scale, softcap, \
                                 window, max_splits, part_o, part_ml, tickets, out);                           \
    }
RF_ATTENTION_ROWS_KERNELS(d64, 64, true)
RF_ATTENTION_ROWS_KERNELS(d128, 128, true)
RF_ATTENTION_ROWS_KERNELS(d256, 256, true)
RF_ATTENTION_ROWS_KERNELS(any, 256, false)
