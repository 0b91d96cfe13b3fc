// sample_rows: the next token of every row of a batch, with rocmforge.sampler's chain (llama.cpp's order):
// logit bias -> repetition/frequency/presence penalties -> grammar mask -> top-k -> top-p -> min-p -> temperature
// -> draw. The numpy twin is rocmforge/ops/sample_rows.py.
// One block per row (any size up to 1024 threads, any wave size); only the token id leaves the device (out[row];
// -1 when every token is banned). Per row: fparams[8] = temperature, top_p, min_p, repeat_penalty,
// frequency_penalty, presence_penalty, u (a uniform number in [0, 1) drawn on the host by the row's seeded
// generator), unused; iparams[2] = top_k (0: off), number of adjusted ids; adjust ids [cap] with (bias, count in
// the penalty window) each. The adjustments are written into the logits in place.
// masks (may be null): [rows, mask_stride] int32, per row a flag (0: no grammar) and the allowed tokens as a
// packed bitmask (bit t % 32 of word t / 32, llguidance's layout); a disallowed token's logit becomes -inf
// before any filter, so the grammar costs one pass over the vocabulary and the ids still are all that comes back.
// top-k, top-p and min-p each keep every finite token at or above a threshold logit (ties kept together, as the
// sampler does), so the survivors are the tokens at or above the largest of the three. The k-th largest logit
// and the top-p boundary are found by radix selection over order-preserving 32-bit keys; probability mass is
// summed as 32.32 fixed point so the boundary does not depend on the order of the additions. The draw walks
// the survivors in token-id order (inverse CDF), each thread over a contiguous range of ids.
typedef unsigned long long u64s;

__device__ __forceinline__ u32 order_key(float x) {
    const u32 b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : b | 0x80000000u;
}

// exp(x - m) (at most 1) as a 32.32 fixed-point weight
__device__ __forceinline__ u64s fixed_mass(float x, float m) { return (u64s)(expf(x - m) * 4294967296.0f); }

// The largest key v among keys >= floor such that the total weight of keys >= v reaches `target`; the weight
// of a key is 1 (mass == false: v is the target-th largest) or fixed_mass (mass == true).
__device__ u32 radix_select(const float* x, int n, u32 floor, u64s target, bool mass, float m, u64s* hist,
                            u64s* pick) {
    u32 prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const float v = x[i];
            const u32 key = order_key(v);
            if (key >= floor && (key & mask) == prefix)
                atomicAdd(&hist[(key >> shift) & 255], mass ? fixed_mass(v, m) : (u64s)1);
        }
        __syncthreads();
        if (threadIdx.x < 16) {  // 16 groups of 16 buckets, summed in parallel
            u64s s = 0;
            for (int j = 0; j < 16; j++) s += hist[threadIdx.x * 16 + j];
            pick[2 + threadIdx.x] = s;
        }
        __syncthreads();
        if (threadIdx.x == 0) {  // from the top bucket down: the first where the weight above reaches target
            u64s above = 0;
            int group = 15;
            for (; group > 0 && above + pick[2 + group] < target; group--) above += pick[2 + group];
            int d = group * 16 + 15;
            for (; d > group * 16 && above + hist[d] < target; d--) above += hist[d];
            pick[0] = (u64s)d;
            pick[1] = target > above ? target - above : 0;
        }
        __syncthreads();
        prefix |= (u32)pick[0] << shift;
        mask |= 255u << shift;
        target = pick[1];
        __syncthreads();
    }
    return prefix;
}

extern "C" __global__ void sample_rows(float* logits, int n, const float* fparams, const int* iparams,
                                       const int* adjust_ids, const float* adjust, int cap, const int* masks,
                                       int mask_stride, int* out) {
    __shared__ u64s hist[256];
    __shared__ u64s pick[18];
    __shared__ float sv[RF_MAX_WARPS];
    __shared__ int si[RF_MAX_WARPS];
    __shared__ float scan[1024];
    __shared__ int chosen;
    const int row = blockIdx.x, lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP;
    const int n_warps = (blockDim.x + RF_WARP - 1) / RF_WARP;
    float* x = logits + (long)row * n;
    const float* fp = fparams + row * 8;
    const float temperature = fp[0], top_p = fp[1], min_p = fp[2], repeat = fp[3], frequency = fp[4],
                presence = fp[5], u = fp[6];
    const int top_k = iparams[row * 2], n_adjust = iparams[row * 2 + 1];

    // logit bias, then penalties on the ids seen in the window (each id listed once)
    for (int j = threadIdx.x; j < n_adjust; j += blockDim.x) {
        const int id = adjust_ids[row * cap + j];
        const float bias = adjust[(row * cap + j) * 2], count = adjust[(row * cap + j) * 2 + 1];
        float v = x[id] + bias;
        if (count > 0.0f) {
            v = v <= 0.0f ? v * repeat : v / repeat;
            v -= count * frequency + presence;
        }
        x[id] = v;
    }
    __syncthreads();
    if (masks != nullptr && masks[(long)row * mask_stride] != 0) {
        const u32* allowed = (const u32*)(masks + (long)row * mask_stride + 1);
        for (int i = threadIdx.x; i < n; i += blockDim.x)
            if (!((allowed[i >> 5] >> (i & 31)) & 1u)) x[i] = RF_NEG_INF;
        __syncthreads();
    }

    // the largest logit (lowest id on ties): the greedy token, and the reference of every probability
    float best = RF_NEG_INF;
    int best_i = 0x7fffffff;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = x[i];
        if (v > best) { best = v; best_i = i; }
    }
    for (int o = RF_WARP / 2; o > 0; o >>= 1) {
        const float v2 = shfl_xor(best, o);
        const int i2 = shfl_xor_int(best_i, o);
        if (v2 > best || (v2 == best && i2 < best_i)) { best = v2; best_i = i2; }
    }
    if (lane == 0) { sv[warp] = best; si[warp] = best_i; }
    __syncthreads();
    best = sv[0]; best_i = si[0];
    for (int w = 1; w < n_warps; w++)
        if (sv[w] > best || (sv[w] == best && si[w] < best_i)) { best = sv[w]; best_i = si[w]; }
    if (temperature == 0.0f || best == RF_NEG_INF) {
        if (threadIdx.x == 0) out[row] = best == RF_NEG_INF ? -1 : best_i;
        return;
    }
    const float m = best;

    // top-k: at least the k-th largest logit (0: every finite logit)
    u32 threshold = order_key(RF_NEG_INF) + 1;
    if (top_k > 0 && top_k < n) threshold = radix_select(x, n, 0, (u64s)top_k, false, m, hist, pick);
    // fewer finite logits than k (a grammar allowing few tokens): the k-th is -inf, and -inf never survives
    threshold = max(threshold, order_key(RF_NEG_INF) + 1);
    // top-p over the top-k survivors at temperature 1: the boundary token's logit
    if (top_p < 1.0f) {
        if (threadIdx.x == 0) pick[0] = 0;
        __syncthreads();
        u64s total = 0;
        for (int i = threadIdx.x; i < n; i += blockDim.x)
            if (order_key(x[i]) >= threshold) total += fixed_mass(x[i], m);
        atomicAdd(&pick[0], total);
        __syncthreads();
        const u64s target = (u64s)ceil((double)top_p * (double)pick[0]);
        __syncthreads();
        threshold = max(threshold, radix_select(x, n, threshold, target > 0 ? target : 1, true, m, hist, pick));
    }
    // min-p: logit >= max + log(min_p), compared in double as the sampler does
    if (min_p > 0.0f) {
        const double bound = (double)m + log((double)min_p);
        float f = (float)bound;
        if ((double)f < bound) f = nextafterf(f, __int_as_float(0x7f800000));
        threshold = max(threshold, order_key(f));
    }

    // the draw: weights exp((x - m) / T) of the survivors in id order; thread t owns ids [t*c, (t+1)*c)
    const int c = (n + blockDim.x - 1) / blockDim.x, i0 = threadIdx.x * c, i1 = min(n, i0 + c);
    float own = 0.0f;
    int last = -1;
    for (int i = i0; i < i1; i++)
        if (order_key(x[i]) >= threshold) { own += expf((x[i] - m) / temperature); last = i; }
    scan[threadIdx.x] = own;
    if (threadIdx.x == 0) chosen = -1;
    __syncthreads();
    for (int o = 1; o < blockDim.x; o <<= 1) {  // inclusive prefix sums over the threads, fixed order
        const float add = threadIdx.x >= o ? scan[threadIdx.x - o] : 0.0f;
        __syncthreads();
        scan[threadIdx.x] += add;
        __syncthreads();
    }
    const float total = scan[blockDim.x - 1], before = threadIdx.x > 0 ? scan[threadIdx.x - 1] : 0.0f;
    const float target = u * total;
    if (own > 0.0f && target >= before && target < scan[threadIdx.x]) {
        float run = before;
        int pick_i = last;  // rounding left the target past this range's sum: its last survivor
        for (int i = i0; i < i1; i++) {
            if (order_key(x[i]) < threshold) continue;
            run += expf((x[i] - m) / temperature);
            if (target < run) { pick_i = i; break; }
        }
        chosen = pick_i;
    }
    __syncthreads();
    if (chosen < 0) {  // the target reached the total (rounding): the last survivor, as the sampler does
        int lastv = last;
        for (int o = RF_WARP / 2; o > 0; o >>= 1) lastv = max(lastv, shfl_xor_int(lastv, o));
        if (lane == 0) si[warp] = lastv;
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int w = 0; w < n_warps; w++) lastv = max(lastv, si[w]);
            out[row] = lastv;
        }
        return;
    }
    if (threadIdx.x == 0) out[row] = chosen;
}
