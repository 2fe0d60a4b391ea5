/* Fused CPU operators for the decode path: each replaces several PyTorch calls, or a copy.
 *
 * - paged_decode: attention of one query token per sequence over its paged context, read in
 *   place through the block table (PyTorch can only attend over contiguous tensors).
 * - paged_prefill: causal attention of a prompt chunk over its paged context, computed for each query
 *   row on its own over fixed 16-key blocks at absolute positions, so a row gets the same bits however
 *   the prompt was chunked or cached (SDPA's result depends on the chunk's shape).
 * - rms_norm: optionally adds a residual first (in place), so "x + sublayer; norm" is one call.
 * - rotary_store: rotates Q and K inside the fused QKV output and writes K and V to their cache slots.
 * - silu_mul: silu(gate) * up over the fused gate/up output.
 * - top_k_rows: the largest entries of each row of the logits (torch's CPU topk took ~1.5 ms a step
 *   for 32 rows of a 49k vocabulary; a pass that rejects 16 at a time takes a third of that).
 * - argmax_rows: each row's first largest entry, for greedy decoding (a fifth of torch's max(dim)).
 *
 * Loops over independent work use OpenMP. PyTorch's CPU build ships libgomp.so.1 and loads it first,
 * so these regions run on the same thread pool as PyTorch's own operators rather than a second one
 * competing for the cores.
 *
 * Written with GCC vector extensions rather than intrinsics: a 16-float vector becomes one AVX-512
 * register, two AVX2 ones or four NEON/SSE ones, so the same source builds on any host. Math is in
 * float32 whatever the storage type; bf16 results are rounded to nearest even. Widths that are not
 * multiples of 16 are refused (return -2) and the caller falls back to PyTorch.
 *
 * Built by flashserve/kernels/__init__.py with the host compiler; Python passes raw pointers of
 * tensors whose layout it has checked.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef float v16f __attribute__((vector_size(64), aligned(4)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32), aligned(2)));

#define MAX_CHUNKS 32 /* head_dim / 16 */
#define MAX_GROUP 16  /* query heads per KV head */
#define KEY_BLOCK 16  /* keys per step of paged_prefill's online softmax */
#define QUERY_TILE 16 /* query rows sharing one transposed key block */
#define NEG_BIG -1e30f /* "minus infinity" that -ffast-math's finite-math assumption keeps intact */

static inline v16f load_f32(const float *p) { return *(const v16f *)p; }
static inline void store_f32(float *p, v16f x) { *(v16f *)p = x; }

static inline v16f load_bf16(const uint16_t *p) {
#ifdef __AVX512F__
    /* GCC splits the generic widening below into halves with extracts and inserts: three times the
     * instructions of one zero-extending load, on the hottest load of decode attention. */
    __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
    return (v16f)_mm512_castsi512_ps(wide);
#else
    v16u wide = __builtin_convertvector(*(const v16h *)p, v16u) << 16;
    v16f f;
    memcpy(&f, &wide, sizeof f);
    return f;
#endif
}

static inline void store_bf16(uint16_t *p, v16f x) {
    v16u u;
    memcpy(&u, &x, sizeof u);
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16; /* round to nearest even */
    *(v16h *)p = __builtin_convertvector(u, v16h);
}

static inline float hmax(v16f x) { /* a fixed tree: 16 -> 8 -> 4 -> 2 -> 1 */
    for (int w = 8; w >= 1; w /= 2)
        for (int i = 0; i < w; ++i) x[i] = x[i] > x[i + w] ? x[i] : x[i + w];
    return x[0];
}

/* The 16 horizontal sums of v[0..15] as one vector (lane i = sum of v[i]), by a fixed tree of shuffles. */
static inline v16f hsum16(const v16f v[16]) {
    v16f t[8], u[4], w[2];
    for (int j = 0; j < 8; ++j)
        t[j] = __builtin_shufflevector(v[2 * j], v[2 * j + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + __builtin_shufflevector(v[2 * j], v[2 * j + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int j = 0; j < 4; ++j)
        u[j] = __builtin_shufflevector(t[2 * j], t[2 * j + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
             + __builtin_shufflevector(t[2 * j], t[2 * j + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int j = 0; j < 2; ++j)
        w[j] = __builtin_shufflevector(u[2 * j], u[2 * j + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
             + __builtin_shufflevector(u[2 * j], u[2 * j + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return __builtin_shufflevector(w[0], w[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + __builtin_shufflevector(w[0], w[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

static inline float load_one_f32(const float *p) { return *p; }

static inline float load_one_bf16(const uint16_t *p) {
    uint32_t wide = (uint32_t)*p << 16;
    float f;
    memcpy(&f, &wide, sizeof f);
    return f;
}

static inline float hsum(v16f x) {
    float s = 0.f;
    for (int i = 0; i < 16; ++i) s += x[i];
    return s;
}

/* e^x, clamped to [e^-87, e^88]: Cody-Waite reduction by ln 2 and Cephes' degree-6 polynomial (~1 ulp).
 * libm's expf is scalar, and GCC does not vectorize calls to it. */
static inline v16f vexp(v16f x) {
    for (int i = 0; i < 16; ++i) x[i] = fminf(fmaxf(x[i], -87.f), 88.f);
    /* round(x / ln 2) without a rounding builtin: truncation of a positive number */
    v16i ki = __builtin_convertvector(x * 1.44269504f + 1024.5f, v16i) - 1024;
    v16f k = __builtin_convertvector(ki, v16f);
    v16f r = x - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    v16f p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.f;
    v16i bits = (ki + 127) << 23;
    v16f two_k;
    memcpy(&two_k, &bits, sizeof two_k);
    return p * two_k;
}

static inline v16f vsilu(v16f g) { return g / (1.f + vexp(-g)); }

/* x[0..n) = e^(x - m) in place; returns their sum. */
static inline float exp_shifted(float *x, int n, float m) {
    v16f sum = {0};
    int t = 0;
    for (; t + 16 <= n; t += 16) {
        v16f e = vexp(load_f32(x + t) - m);
        store_f32(x + t, e);
        sum += e;
    }
    float total = hsum(sum);
    if (t < n) {
        v16f tail = {0};
        memcpy(&tail, x + t, sizeof(float) * (size_t)(n - t));
        v16f e = vexp(tail - m);
        memcpy(x + t, &e, sizeof(float) * (size_t)(n - t));
        for (int i = 0; i < n - t; ++i) total += e[i];
    }
    return total;
}

/* Attention and the cache store: activations of type T, the KV cache of type C (a bf16 cache under float32 \
 * activations halves the bytes decode attention reads). */                                                 \
#define DEFINE_CACHE_OPS(SUF, T, LOAD, STORE, LOAD_ONE, C, LOADC, STOREC)                                   \
/* One sequence's query heads that share KV head g. Always inlined with literal chunks and group where    \
 * paged_decode knows them, so that the queries, one key and the outputs live in registers; with other   \
 * values, the same loops run on arrays. scores: group * (padded length) floats. */                       \
static inline __attribute__((always_inline)) void decode_kv_head_##SUF(                                  \
        const T *qb, const C *key_cache, const C *value_cache, T *ob, const int32_t *table, int len,     \
        int block_size, long row, int g, int head_dim, float scale, float *scores, const int chunks,     \
        const int group) {                                                                                 \
    const int padded = (len + 15) & ~15;                                                                   \
    const long head_off = (long)g * head_dim;                                                              \
    v16f qv[MAX_GROUP][MAX_CHUNKS], acc[MAX_GROUP][MAX_CHUNKS], kv[MAX_CHUNKS], prod[MAX_GROUP][16];       \
    for (int j = 0; j < group; ++j)                                                                        \
        for (int c = 0; c < chunks; ++c)                                                                   \
            qv[j][c] = LOAD(qb + (long)(g * group + j) * head_dim + c * 16) * scale;                       \
    /* Scores 16 keys at a time: 16 partial-product vectors reduce together (hsum16), instead of one     \
     * serial horizontal sum per key. Past the end, the last key repeats; unused. */                     \
    for (int t0 = 0; t0 < len; t0 += 16) {                                                                 \
        const C *keys[16];                                                                                 \
        if (block_size % 16 == 0) { /* the 16 keys share a block: one division, not 16 */                 \
            const C *first = key_cache + ((long)table[t0 / block_size] * block_size + t0 % block_size)    \
                             * row + head_off;                                                             \
            for (int i = 0; i < 16; ++i) keys[i] = first + (t0 + i < len ? i : len - 1 - t0) * row;       \
        } else {                                                                                           \
            for (int i = 0; i < 16; ++i) {                                                                 \
                const int t = t0 + i < len ? t0 + i : len - 1;                                             \
                keys[i] = key_cache + ((long)table[t / block_size] * block_size + t % block_size) * row   \
                          + head_off;                                                                      \
            }                                                                                              \
        }                                                                                                  \
        if (t0 + 16 < len && block_size % 16 == 0) { /* the cache is DRAM-bound: ask for the next 16 keys */ \
            const int t1 = t0 + 16;                                                                        \
            const char *next = (const char *)(key_cache + ((long)table[t1 / block_size] * block_size +      \
                                                          t1 % block_size) * row + head_off);              \
            const char *next_v = (const char *)value_cache + (next - (const char *)key_cache);             \
            for (int i = 0; i < 16 && t1 + i < len; ++i)                                                   \
                for (int byte = 0; byte < head_dim * (int)sizeof(C); byte += 64) {                         \
                    __builtin_prefetch(next + (long)i * row * (long)sizeof(C) + byte);                     \
                    __builtin_prefetch(next_v + (long)i * row * (long)sizeof(C) + byte);                   \
                }                                                                                          \
        }                                                                                                  \
        for (int i = 0; i < 16; ++i) { /* each key read (and widened) once for all its heads */            \
            for (int c = 0; c < chunks; ++c) kv[c] = LOADC(keys[i] + c * 16);                              \
            for (int j = 0; j < group; ++j) {                                                              \
                v16f s = qv[j][0] * kv[0];                                                                 \
                for (int c = 1; c < chunks; ++c) s += qv[j][c] * kv[c];                                    \
                prod[j][i] = s;                                                                            \
            }                                                                                              \
        }                                                                                                  \
        for (int j = 0; j < group; ++j) store_f32(scores + (long)j * padded + t0, hsum16(prod[j]));        \
    }                                                                                                      \
    for (int j = 0; j < group; ++j) {                                                                      \
        float *sj = scores + (long)j * padded;                                                             \
        float m = -INFINITY;                                                                               \
        for (int t = 0; t < len; ++t) m = sj[t] > m ? sj[t] : m;                                           \
        const float inv = 1.f / exp_shifted(sj, len, m);                                                   \
        for (int t = 0; t < len; ++t) sj[t] *= inv;                                                        \
        for (int c = 0; c < chunks; ++c) acc[j][c] = (v16f){0};                                            \
    }                                                                                                      \
    for (int t0 = 0, blk = 0; t0 < len; t0 += block_size, ++blk) {                                         \
        const C *base = value_cache + (long)table[blk] * block_size * row + head_off;                      \
        const int n = len - t0 < block_size ? len - t0 : block_size;                                       \
        for (int i = 0; i < n; ++i) {                                                                      \
            for (int c = 0; c < chunks; ++c) kv[c] = LOADC(base + i * row + c * 16);                       \
            for (int j = 0; j < group; ++j) {                                                              \
                const float p = scores[(long)j * padded + t0 + i];                                         \
                for (int c = 0; c < chunks; ++c) acc[j][c] += p * kv[c];                                   \
            }                                                                                              \
        }                                                                                                  \
    }                                                                                                      \
    for (int j = 0; j < group; ++j)                                                                        \
        for (int c = 0; c < chunks; ++c)                                                                   \
            STORE(ob + (long)(g * group + j) * head_dim + c * 16, acc[j][c]);                              \
}                                                                                                          \
                                                                                                           \
int paged_decode_##SUF(const T *q, long q_stride, const C *key_cache, const C *value_cache, T *out,       \
                       long out_stride, const int32_t *block_tables, const int32_t *context_lens,          \
                       int num_seqs, int max_blocks_per_seq, int block_size, int num_heads,                \
                       int num_kv_heads, int head_dim, float scale) {                                      \
    const int group = num_heads / num_kv_heads, chunks = head_dim / 16;                                    \
    if (head_dim % 16 || chunks > MAX_CHUNKS || group > MAX_GROUP) return -2;                              \
    const long row = (long)num_kv_heads * head_dim; /* elements per cache slot */                         \
    int max_len = 1;                                                                                       \
    for (int b = 0; b < num_seqs; ++b) if (context_lens[b] > max_len) max_len = context_lens[b];           \
    int failed = 0;                                                                                        \
    _Pragma("omp parallel")                                                                                \
    {                                                                                                      \
    float *scores = malloc(sizeof(float) * (size_t)group * ((size_t)max_len + 16));                        \
    if (!scores) { _Pragma("omp atomic write") failed = 1; }                                               \
    _Pragma("omp for schedule(dynamic)")                                                                   \
    for (long work = 0; work < (long)num_seqs * num_kv_heads; ++work) {                                    \
        if (!scores) continue;                                                                             \
        const int b = (int)(work / num_kv_heads), g = (int)(work % num_kv_heads);                          \
        const T *qb = q + b * q_stride;                                                                    \
        T *ob = out + b * out_stride;                                                                      \
        const int32_t *table = block_tables + (long)b * max_blocks_per_seq;                                \
        const int len = context_lens[b];                                                                   \
        /* The shapes of common models get their own copy, specialised at compile time. */                \
        if (chunks == 4 && group == 3)                                                                     \
            decode_kv_head_##SUF(qb, key_cache, value_cache, ob, table, len, block_size, row, g, head_dim, \
                                 scale, scores, 4, 3);                                                     \
        else if (chunks == 4 && group == 4)                                                                \
            decode_kv_head_##SUF(qb, key_cache, value_cache, ob, table, len, block_size, row, g, head_dim, \
                                 scale, scores, 4, 4);                                                     \
        else if (chunks == 8 && group == 4)                                                                \
            decode_kv_head_##SUF(qb, key_cache, value_cache, ob, table, len, block_size, row, g, head_dim, \
                                 scale, scores, 8, 4);                                                     \
        else                                                                                               \
            decode_kv_head_##SUF(qb, key_cache, value_cache, ob, table, len, block_size, row, g, head_dim, \
                                 scale, scores, chunks, group);                                            \
    }                                                                                                      \
    free(scores);                                                                                          \
    }                                                                                                      \
    return failed ? -1 : 0;                                                                                \
}                                                                                                          \
                                                                                                           \
int paged_prefill_##SUF(const T *q, long q_stride, const C *key_cache, const C *value_cache, T *out,     \
                        long out_stride, const int32_t *block_table, int q_len, int ctx_len, int block_size,  \
                        int num_heads, int num_kv_heads, int head_dim, float scale) {                        \
    const int group = num_heads / num_kv_heads, chunks = head_dim / 16;                                    \
    if (head_dim % 16 || chunks > MAX_CHUNKS || group > MAX_GROUP) return -2;                              \
    const long row = (long)num_kv_heads * head_dim;                                                        \
    const int first_pos = ctx_len - q_len, tiles = (q_len + QUERY_TILE - 1) / QUERY_TILE;                  \
    int failed = 0;                                                                                        \
    _Pragma("omp parallel")                                                                                \
    {                                                                                                      \
    /* Per thread: a key block transposed ([dim][16]) and its values ([16][dim]), shared by a tile of   \
     * query rows, and each (row, head)'s running max, sum and output. */                                 \
    const size_t states = (size_t)QUERY_TILE * group;                                                      \
    float *kt = aligned_alloc(64, sizeof(float) * ((size_t)head_dim * KEY_BLOCK * 2 + states * (17 + head_dim))); \
    float *vb = NULL, *m = NULL, *l = NULL, *acc = NULL;                                                   \
    if (kt) {                                                                                              \
        vb = kt + (size_t)head_dim * KEY_BLOCK, m = vb + (size_t)head_dim * KEY_BLOCK;                     \
        l = m + states, acc = l + states * 16; /* l: 16 lane sums per state */                             \
    } else {                                                                                               \
        _Pragma("omp atomic write") failed = 1;                                                            \
    }                                                                                                      \
    _Pragma("omp for schedule(dynamic)")                                                                   \
    for (long work = 0; work < (long)tiles * num_kv_heads; ++work) {                                       \
        if (!kt) continue;                                                                                 \
        const int r0 = (int)(work / num_kv_heads) * QUERY_TILE, g = (int)(work % num_kv_heads);            \
        const int rows = q_len - r0 < QUERY_TILE ? q_len - r0 : QUERY_TILE;                                \
        for (size_t s_ = 0; s_ < states; ++s_) m[s_] = NEG_BIG;                                            \
        memset(l, 0, sizeof(float) * states * 16);                                                         \
        memset(acc, 0, sizeof(float) * states * head_dim);                                                 \
        const int last = first_pos + r0 + rows - 1;                                                        \
        for (int k0 = 0; k0 <= last; k0 += KEY_BLOCK) {                                                    \
            for (int i = 0; i < KEY_BLOCK; ++i) {                                                          \
                const int t = k0 + i;                                                                      \
                if (t > last) { /* never weighted (see valid below); zeros keep the sums finite */          \
                    for (int d = 0; d < head_dim; ++d) kt[d * KEY_BLOCK + i] = 0.f, vb[i * head_dim + d] = 0.f; \
                    continue;                                                                              \
                }                                                                                          \
                const long slot = block_size % KEY_BLOCK == 0 /* one block holds the 16 keys */          \
                    ? (long)block_table[k0 / block_size] * block_size + k0 % block_size + i                \
                    : (long)block_table[t / block_size] * block_size + t % block_size;                     \
                const C *kr = key_cache + slot * row + (long)g * head_dim;                                 \
                const C *vr = value_cache + slot * row + (long)g * head_dim;                               \
                for (int c = 0; c < chunks; ++c) {                                                         \
                    v16f kv = LOADC(kr + c * 16);                                                           \
                    for (int e = 0; e < 16; ++e) kt[(c * 16 + e) * KEY_BLOCK + i] = kv[e];                 \
                    store_f32(vb + i * head_dim + c * 16, LOADC(vr + c * 16));                              \
                }                                                                                          \
            }                                                                                              \
            for (int r = 0; r < rows; ++r) {                                                               \
                const int pos = first_pos + r0 + r;                                                        \
                /* A row only ever visits the blocks up to its own position: its work is its own. */     \
                if (k0 > pos) continue;                                                                    \
                /* Only a row's last block has keys past it; multiplying by 1 elsewhere changes nothing. */ \
                const int partial = k0 + KEY_BLOCK - 1 > pos;                                              \
                v16f valid;                                                                                \
                for (int i = 0; i < KEY_BLOCK; ++i) valid[i] = k0 + i <= pos ? 1.f : 0.f;                  \
                for (int j = 0; j < group; ++j) {                                                          \
                    const size_t st = (size_t)r * group + j;                                               \
                    const T *qr = q + (long)(r0 + r) * q_stride + (long)(g * group + j) * head_dim;         \
                    /* Four independent sums: one chain of head_dim dependent FMAs would stall on latency. */ \
                    v16f s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};                                           \
                    for (int d = 0; d < head_dim; d += 4) {                                                \
                        s0 += LOAD_ONE(qr + d) * load_f32(kt + d * KEY_BLOCK);                             \
                        s1 += LOAD_ONE(qr + d + 1) * load_f32(kt + (d + 1) * KEY_BLOCK);                   \
                        s2 += LOAD_ONE(qr + d + 2) * load_f32(kt + (d + 2) * KEY_BLOCK);                   \
                        s3 += LOAD_ONE(qr + d + 3) * load_f32(kt + (d + 3) * KEY_BLOCK);                   \
                    }                                                                                      \
                    v16f s = ((s0 + s1) + (s2 + s3)) * scale;                                              \
                    if (partial)                                                                           \
                        for (int i = 0; i < KEY_BLOCK; ++i) s[i] = valid[i] > 0.f ? s[i] : NEG_BIG;        \
                    const float block_max = hmax(s);                                                       \
                    const float m_new = block_max > m[st] ? block_max : m[st];                             \
                    v16f p = vexp(s - m_new);                                                              \
                    if (partial) p *= valid;                                                               \
                    /* e^0 is exactly 1: while the max holds, skipping the rescale changes no bit. */      \
                    const int rescale = m_new != m[st];                                                    \
                    const float corr = rescale ? vexp((v16f){0} + (m[st] - m_new))[0] : 1.f;               \
                    /* The sum stays a vector of 16 lane sums until the end: no reduction per block. */   \
                    v16f *lv = (v16f *)(l + st * 16);                                                      \
                    *lv = (rescale ? *lv * corr : *lv) + p;                                                \
                    m[st] = m_new;                                                                         \
                    float *a = acc + st * head_dim;                                                        \
                    v16f sums[MAX_CHUNKS];                                                                 \
                    for (int c = 0; c < chunks; ++c)                                                       \
                        sums[c] = rescale ? load_f32(a + c * 16) * corr : load_f32(a + c * 16);            \
                    for (int i = 0; i < KEY_BLOCK; ++i) /* the chunks are independent chains */            \
                        for (int c = 0; c < chunks; ++c) sums[c] += p[i] * load_f32(vb + i * head_dim + c * 16); \
                    for (int c = 0; c < chunks; ++c) store_f32(a + c * 16, sums[c]);                       \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        for (int r = 0; r < rows; ++r)                                                                     \
            for (int j = 0; j < group; ++j) {                                                              \
                const size_t st = (size_t)r * group + j;                                                   \
                const float inv = 1.f / hsum(*(v16f *)(l + st * 16));                                     \
                for (int c = 0; c < chunks; ++c)                                                           \
                    STORE(out + (long)(r0 + r) * out_stride + (long)(g * group + j) * head_dim + c * 16,     \
                          load_f32(acc + st * head_dim + c * 16) * inv);                                   \
            }                                                                                              \
    }                                                                                                      \
    free(kt);                                                                                              \
    }                                                                                                      \
    return failed ? -1 : 0;                                                                                \
}                                                                                                          \
                                                                                                           \
int rotary_store_##SUF(T *qkv, long rows, int num_heads, int num_kv_heads, int head_dim,                    \
                       const int64_t *positions, const float *cos_half, const float *sin_half,             \
                       const int64_t *slots, C *key_cache, C *value_cache) {                               \
    const int half = head_dim / 2;                                                                         \
    if (half % 16) return -2;                                                                              \
    const long width = (long)(num_heads + 2 * num_kv_heads) * head_dim, kv_width = (long)num_kv_heads * head_dim; \
    for (long r = 0; r < rows; ++r) {                                                                      \
        T *row = qkv + r * width;                                                                          \
        const float *cs = cos_half + positions[r] * half, *sn = sin_half + positions[r] * half;            \
        for (int h = 0; h < num_heads + num_kv_heads; ++h) {                                               \
            T *x = row + (long)h * head_dim;                                                               \
            for (int i = 0; i < half; i += 16) {                                                           \
                v16f x1 = LOAD(x + i), x2 = LOAD(x + half + i), c = load_f32(cs + i), s = load_f32(sn + i); \
                STORE(x + i, x1 * c - x2 * s);                                                             \
                STORE(x + half + i, x2 * c + x1 * s);                                                      \
            }                                                                                              \
        }                                                                                                  \
        if (!slots) continue; /* the caller stores K/V itself */                                           \
        const T *k = row + (long)num_heads * head_dim, *v = k + kv_width;                                  \
        for (long i = 0; i < kv_width; i += 16) {                                                          \
            STOREC(key_cache + slots[r] * kv_width + i, LOAD(k + i));                                      \
            STOREC(value_cache + slots[r] * kv_width + i, LOAD(v + i));                                    \
        }                                                                                                  \
    }                                                                                                      \
    return 0;                                                                                              \
}                                                                                                          \

#define DEFINE_OPS(SUF, T, LOAD, STORE)                                                                     \
int rms_norm_##SUF(const T *x, T *residual, const T *weight, T *out, long rows, int dim, float eps) {      \
    if (dim % 16) return -2;                                                                               \
    const int chunks = dim / 16;                                                                           \
    for (long r = 0; r < rows; ++r) {                                                                      \
        const T *xr = x + r * dim;                                                                         \
        T *src = (T *)xr;                                                                                  \
        if (residual) { /* residual += x, rounded to T, and the sum is what gets normalised */             \
            src = residual + r * dim;                                                                      \
            for (int c = 0; c < chunks; ++c) STORE(src + c * 16, LOAD(src + c * 16) + LOAD(xr + c * 16));  \
        }                                                                                                  \
        v16f ss = {0};                                                                                     \
        for (int c = 0; c < chunks; ++c) { v16f v = LOAD(src + c * 16); ss += v * v; }                     \
        const float inv = 1.f / sqrtf(hsum(ss) / dim + eps);                                               \
        for (int c = 0; c < chunks; ++c)                                                                   \
            STORE(out + r * dim + c * 16, LOAD(src + c * 16) * inv * LOAD(weight + c * 16));               \
    }                                                                                                      \
    return 0;                                                                                              \
}                                                                                                          \
                                                                                                           \
int silu_mul_##SUF(const T *gate_up, T *out, long rows, int inter) {                                       \
    if (inter % 16) return -2;                                                                             \
    _Pragma("omp parallel for if (rows * inter >= 16384)")                                                 \
    for (long r = 0; r < rows; ++r) {                                                                      \
        const T *g = gate_up + r * 2L * inter, *u = g + inter;                                             \
        for (int i = 0; i < inter; i += 16) STORE(out + r * inter + i, vsilu(LOAD(g + i)) * LOAD(u + i));  \
    }                                                                                                      \
    return 0;                                                                                              \
}

DEFINE_CACHE_OPS(f32, float, load_f32, store_f32, load_one_f32, float, load_f32, store_f32)
DEFINE_CACHE_OPS(bf16, uint16_t, load_bf16, store_bf16, load_one_bf16, uint16_t, load_bf16, store_bf16)
DEFINE_CACHE_OPS(f32_bf16, float, load_f32, store_f32, load_one_f32, uint16_t, load_bf16, store_bf16)
DEFINE_OPS(f32, float, load_f32, store_f32)
DEFINE_OPS(bf16, uint16_t, load_bf16, store_bf16)

/* Indices of the k largest entries of each row, largest first; ties keep the lower index first. */
int top_k_rows(const float *x, long rows, int cols, int k, int64_t *out) {
    if (k < 1 || k > 16 || cols < k) return -2;
#pragma omp parallel for schedule(static) if (rows > 1)
    for (long r = 0; r < rows; ++r) {
        const float *row = x + r * cols;
        float best[16];
        int64_t idx[16];
        int n = 0;
        for (int c = 0; c < cols; ++c) {
            /* Whole vectors below the current k-th value are skipped without a look at their lanes. */
            if (n == k && c % 16 == 0 && c + 16 <= cols && hmax(load_f32(row + c)) <= best[k - 1]) {
                c += 15;
                continue;
            }
            const float v = row[c];
            if (n == k && v <= best[k - 1]) continue;
            int at = n < k ? n++ : k - 1;
            while (at > 0 && best[at - 1] < v) { /* strict: an equal value stays ahead */
                best[at] = best[at - 1], idx[at] = idx[at - 1];
                --at;
            }
            best[at] = v, idx[at] = c;
        }
        memcpy(out + r * k, idx, sizeof(int64_t) * (size_t)k);
    }
    return 0;
}

/* out[r] = the first index of row r's largest entry (rows of finite floats). One pass: each lane keeps its
 * largest value and the first column it came from; the lanes are then merged, lowest column winning ties. */
int argmax_rows(const float *x, long rows, int cols, int64_t *out) {
    if (cols < 16) return -2;
#pragma omp parallel for schedule(static) if (rows > 1)
    for (long r = 0; r < rows; ++r) {
        const float *row = x + r * cols;
        v16f m = load_f32(row);
        v16i at;
        for (int i = 0; i < 16; ++i) at[i] = i;
        int c = 16;
#ifdef __AVX512F__
        __m512 vm = _mm512_loadu_ps(row);
        __m512i vat = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), vc = vat;
        for (; c + 16 <= cols; c += 16) {
            const __m512 v = _mm512_loadu_ps(row + c);
            const __mmask16 gt = _mm512_cmp_ps_mask(v, vm, _CMP_GT_OQ); /* strict: a lane keeps its first maximum */
            vc = _mm512_add_epi32(vc, _mm512_set1_epi32(16));
            vat = _mm512_mask_mov_epi32(vat, gt, vc);
            vm = _mm512_mask_mov_ps(vm, gt, v);
        }
        _mm512_storeu_ps((float *)&m, vm);
        _mm512_storeu_si512((void *)&at, vat);
#else
        for (; c + 16 <= cols; c += 16) {
            const v16f v = load_f32(row + c);
            for (int i = 0; i < 16; ++i) { /* strict: a lane keeps its first maximum */
                at[i] = v[i] > m[i] ? c + i : at[i];
                m[i] = v[i] > m[i] ? v[i] : m[i];
            }
        }
#endif
        float best = m[0];
        int64_t best_at = at[0];
        for (int i = 1; i < 16; ++i)
            if (m[i] > best || (m[i] == best && at[i] < best_at)) best = m[i], best_at = at[i];
        for (; c < cols; ++c)
            if (row[c] > best) best = row[c], best_at = c;
        out[r] = best_at;
    }
    return 0;
}
