/* Dense matmul of prompt rows whose every row gets the same bits alone, in any batch and in any chunk.
 *
 * Why it exists: oneDNN's bf16 matmul picks its microkernel, and with it the order in which it sums over
 * K, from the shape of the whole call. On Intel with AMX every row tile happened to get the same one; on
 * Zen 4 (AVX512-BF16, no AMX) a batch of 5 rows of a 1536-input projection gave row 4 other bits than
 * that row alone. A row's result must not depend on its neighbours (tests/unit/test_linear.py), so the
 * property is built in here instead of hoped for from a vendor library:
 *
 * - Every output element is one accumulator that runs over K from first to last in one fixed sequence of
 *   instructions; K is never split, and nothing is summed across threads.
 * - M only says how many tiles of TILE_ROWS rows run. The last, partial tile runs the very same code with
 *   its missing rows pointed at a real row and their outputs sent to a scratch buffer, so a row's
 *   instructions never depend on how many rows came with it. Columns go to threads, never rows or K.
 * - Which column group a column falls in (a group of GROUP_BLOCKS blocks, or a tail block) depends on N
 *   only, never on M.
 * The file is compiled without reassociation (the pragma below), so -ffast-math cannot regroup a chain.
 *
 * Paths, one per level, each batch-invariant on its own (different levels need not agree):
 * - AVX512-BF16 (Zen 4, Sapphire Rapids and later): VDPBF16PS, 32 bf16 multiply-adds per instruction.
 * - Anything else (AVX-512 without BF16, AVX2, SSE2, NEON): GCC vector extensions; a bf16 is the high half
 *   of a float32, so widening is a shift or a mask, and each k is one (fused where the level has FMA)
 *   multiply-add.
 * AMX is not used: the AVX512-BF16 path serves AMX machines too.
 *
 * Weight layout (flashserve/models/linear.py, pack_dense): per block of 16 outputs, for bf16 the pairs
 * [k/2][16 outputs][2 inputs] (one VDPBF16PS operand per pair of inputs); for float32 [k][16 outputs].
 */
#pragma GCC optimize("no-associative-math")
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__x86_64__) && defined(__AVX512F__) && defined(__AVX512BF16__)
#define DENSE_BF16DP 1
#endif

#define BLOCK 16 /* outputs per packed block */
/* Rows per tile x blocks per column group: the accumulators fill the registers without spilling. Every tile,
 * partial or not, runs the same code. */
#if defined(__AVX512F__)
#define TILE_ROWS 6    /* 6 rows x 4 blocks: 24 of the 32 zmm registers hold accumulators */
#define GROUP_BLOCKS 4 /* (6 x 4 measured as fast as oneDNN on Zen 4; 4 x 4 was 10-25% slower) */
#elif defined(__AVX__) || defined(__aarch64__)
#define TILE_ROWS 4    /* 4 rows x 1 block: 8 of AVX2's 16 ymm registers (16 of NEON's 32) */
#define GROUP_BLOCKS 1
#else
#define TILE_ROWS 2    /* SSE2: 2 rows x 1 block, 8 of the 16 xmm registers */
#define GROUP_BLOCKS 1
#endif
#define CHUNK_ROWS (16 * TILE_ROWS) /* rows per work item: whole tiles */

typedef float v16f __attribute__((vector_size(64), aligned(4)));
typedef uint32_t v16u __attribute__((vector_size(64), aligned(4)));

static inline v16f bias_or_zero(const float *bias, int col) {
    v16f b = {0};
    if (bias) memcpy(&b, bias + col, sizeof b);
    return b;
}

#ifdef DENSE_BF16DP
/* Rows x[0..3] (bf16, k inputs, k even) against NB consecutive packed blocks starting at w. */
static inline __attribute__((always_inline)) void tile_bf16(const uint16_t *const x[TILE_ROWS], const uint16_t *w,
                                                            long block_elems, int k, int nb, const float *bias,
                                                            int col, float *const out[TILE_ROWS]) {
    __m512 acc[TILE_ROWS][GROUP_BLOCKS];
    for (int r = 0; r < TILE_ROWS; ++r)
        for (int c = 0; c < nb; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int kp = 0; kp < k / 2; ++kp) {
        __m512bh wv[GROUP_BLOCKS];
        for (int c = 0; c < nb; ++c) wv[c] = (__m512bh)_mm512_loadu_si512((const void *)(w + c * block_elems + kp * 32));
        for (int r = 0; r < TILE_ROWS; ++r) {
            int32_t pair;
            memcpy(&pair, x[r] + 2 * kp, sizeof pair);
            __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
            for (int c = 0; c < nb; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, wv[c]);
        }
    }
    for (int r = 0; r < TILE_ROWS; ++r)
        for (int c = 0; c < nb; ++c) {
            v16f b = bias_or_zero(bias, col + c * BLOCK);
            _mm512_storeu_ps(out[r] + c * BLOCK, _mm512_add_ps(acc[r][c], (__m512)b));
        }
}
#else
/* The generic paths work in the level's own vector width (GCC splits a wider vector type into pieces it then
 * keeps in memory: 30x slower at AVX2): VW floats a vector, VPB vectors a block of 16 outputs. */
#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4 /* SSE2, NEON */
#endif
#define VPB (BLOCK / VW)
typedef float vf __attribute__((vector_size(VW * 4), aligned(4)));
typedef uint32_t vu __attribute__((vector_size(VW * 4), aligned(4)));

static inline __attribute__((always_inline)) void tile_bf16(const uint16_t *const x[TILE_ROWS], const uint16_t *w,
                                                            long block_elems, int k, int nb, const float *bias,
                                                            int col, float *const out[TILE_ROWS]) {
    vf acc[TILE_ROWS][GROUP_BLOCKS * VPB];
    for (int r = 0; r < TILE_ROWS; ++r)
        for (int v = 0; v < nb * VPB; ++v) acc[r][v] = (vf){0};
    for (int kp = 0; kp < k / 2; ++kp) {
        vf w0[GROUP_BLOCKS * VPB], w1[GROUP_BLOCKS * VPB];
        for (int c = 0; c < nb; ++c)
            for (int v = 0; v < VPB; ++v) {
                vu pairs;
                memcpy(&pairs, w + c * block_elems + kp * 32 + v * VW * 2, sizeof pairs);
                vu lo = pairs << 16, hi = pairs & 0xFFFF0000u; /* input 2kp in the low half, 2kp + 1 high */
                memcpy(&w0[c * VPB + v], &lo, sizeof lo);
                memcpy(&w1[c * VPB + v], &hi, sizeof hi);
            }
        for (int r = 0; r < TILE_ROWS; ++r) {
            uint32_t b0 = (uint32_t)x[r][2 * kp] << 16, b1 = (uint32_t)x[r][2 * kp + 1] << 16;
            float x0, x1;
            memcpy(&x0, &b0, sizeof x0);
            memcpy(&x1, &b1, sizeof x1);
            for (int v = 0; v < nb * VPB; ++v) {
                acc[r][v] += w0[v] * x0;
                acc[r][v] += w1[v] * x1;
            }
        }
    }
    for (int r = 0; r < TILE_ROWS; ++r)
        for (int v = 0; v < nb * VPB; ++v) {
            vf b = {0};
            if (bias) memcpy(&b, bias + col + v * VW, sizeof b);
            vf o = acc[r][v] + b;
            memcpy(out[r] + v * VW, &o, sizeof o);
        }
}
#endif

#ifndef VW
#define VW 16
#define VPB 1
typedef float vf __attribute__((vector_size(64), aligned(4)));
#endif

static inline __attribute__((always_inline)) void tile_f32(const float *const x[TILE_ROWS], const float *w,
                                                           long block_elems, int k, int nb, const float *bias,
                                                           int col, float *const out[TILE_ROWS]) {
    vf acc[TILE_ROWS][GROUP_BLOCKS * VPB];
    for (int r = 0; r < TILE_ROWS; ++r)
        for (int v = 0; v < nb * VPB; ++v) acc[r][v] = (vf){0};
    for (int i = 0; i < k; ++i) {
        vf wv[GROUP_BLOCKS * VPB];
        for (int c = 0; c < nb; ++c)
            for (int v = 0; v < VPB; ++v) memcpy(&wv[c * VPB + v], w + c * block_elems + (long)i * BLOCK + v * VW, sizeof(vf));
        for (int r = 0; r < TILE_ROWS; ++r) {
            float xi = x[r][i];
            for (int v = 0; v < nb * VPB; ++v) acc[r][v] += wv[v] * xi;
        }
    }
    for (int r = 0; r < TILE_ROWS; ++r)
        for (int v = 0; v < nb * VPB; ++v) {
            vf b = {0};
            if (bias) memcpy(&b, bias + col + v * VW, sizeof b);
            vf o = acc[r][v] + b;
            memcpy(out[r] + v * VW, &o, sizeof o);
        }
}

/* The driver both element types share. Work items are (column group, chunk of CHUNK_ROWS rows), group-major,
 * split evenly between threads: a few groups of many rows still keep every core busy, and neighbouring
 * items share a group's weights in cache. A group is GROUP_BLOCKS blocks, or one block in the tail; `nb` is
 * a constant in each call so every variant is unrolled on its own, and which variant a column gets
 * depends on n alone. Chunks are whole tiles, so only the batch's last tile is ever partial. */
#define DENSE_DRIVER(NAME, T, TILE, BLOCK_ELEMS)                                                              \
    int NAME(const T *x, long x_stride, int rows, int k, const T *w, const float *bias, float *out,           \
             long out_stride, int n) {                                                                        \
        if (rows <= 0 || n <= 0 || n % BLOCK || k <= 0 || k % 2) return -2;                                   \
        const int blocks = n / BLOCK, full = blocks / GROUP_BLOCKS;                                           \
        const int groups = full + (blocks - full * GROUP_BLOCKS);                                             \
        const int chunks = (rows + CHUNK_ROWS - 1) / CHUNK_ROWS;                                              \
        const long block_elems = (BLOCK_ELEMS);                                                               \
        _Pragma("omp parallel for schedule(static) if (groups * chunks > 1)")                                \
        for (int item = 0; item < groups * chunks; ++item) {                                                  \
            const int g = item / chunks, end = (item % chunks + 1) * CHUNK_ROWS;                              \
            const int b0 = g < full ? g * GROUP_BLOCKS : full * GROUP_BLOCKS + (g - full);                    \
            const int nb = g < full ? GROUP_BLOCKS : 1;                                                       \
            float scratch[TILE_ROWS][GROUP_BLOCKS * BLOCK];                                                   \
            for (int r0 = (item % chunks) * CHUNK_ROWS; r0 < rows && r0 < end; r0 += TILE_ROWS) {             \
                const T *xr[TILE_ROWS];                                                                       \
                float *orow[TILE_ROWS];                                                                       \
                for (int r = 0; r < TILE_ROWS; ++r) {                                                         \
                    const int real = r0 + r < rows;                                                           \
                    xr[r] = x + (long)(real ? r0 + r : r0) * x_stride;                                        \
                    orow[r] = real ? out + (long)(r0 + r) * out_stride + b0 * BLOCK : scratch[r];             \
                }                                                                                             \
                const T *wg = w + (long)b0 * block_elems;                                                     \
                if (nb == GROUP_BLOCKS)                                                                       \
                    TILE(xr, wg, block_elems, k, GROUP_BLOCKS, bias, b0 * BLOCK, orow);                       \
                else                                                                                          \
                    TILE(xr, wg, block_elems, k, 1, bias, b0 * BLOCK, orow);                                  \
            }                                                                                                 \
        }                                                                                                     \
        return 0;                                                                                             \
    }

/* out [rows, n] float32 = x [rows, k] @ W.T + bias, for bf16 x (row stride x_stride) and W packed as above;
 * bias float32 [n] or NULL. n must be a multiple of 16 and k even (the caller pads); -2 otherwise. */
DENSE_DRIVER(dense_linear_bf16, uint16_t, tile_bf16, (long)k * BLOCK)
/* The same for float32 x and W. */
DENSE_DRIVER(dense_linear_f32, float, tile_f32, (long)k * BLOCK)

/* The 16-lane chain of the gather dots below, in registers that fit the level: one zmm with AVX-512, two
 * 8-lane halves below it (GCC keeps a 64-byte vector in memory between iterations there: x86-64-v3 ran 8x
 * slower). The same lanes, the same operations and the same tree either way, so the same bits. */
#if defined(__AVX512F__)
typedef float lanes16 __attribute__((vector_size(64)));
static inline lanes16 lanes_load(const float *p) { lanes16 v; memcpy(&v, p, sizeof v); return v; }
static inline lanes16 lanes_madd(lanes16 acc, lanes16 a, lanes16 b) { return acc + a * b; }
/* 16 int8 codes times one scale: float32 values that are exact (an fp16 scale times a code < 2^7) */
static inline lanes16 lanes_codes(const int8_t *p, float scale) {
    return (lanes16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))) * scale;
}
static inline float chain_sum(lanes16 v) {
    for (int w = 8; w >= 1; w /= 2)
        for (int j = 0; j < w; ++j) v[j] += v[j + w];
    return v[0];
}
#else
typedef float v8f __attribute__((vector_size(32)));
typedef int8_t v8c __attribute__((vector_size(8)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef struct { v8f lo, hi; } lanes16; /* lanes 0-7 and 8-15 */
static inline lanes16 lanes_load(const float *p) {
    lanes16 v;
    memcpy(&v.lo, p, sizeof v.lo);
    memcpy(&v.hi, p + 8, sizeof v.hi);
    return v;
}
static inline lanes16 lanes_madd(lanes16 acc, lanes16 a, lanes16 b) {
    acc.lo += a.lo * b.lo;
    acc.hi += a.hi * b.hi;
    return acc;
}
/* 8 int8 codes as float32; by intrinsics on x86, where GCC would widen the generic vector lane by lane */
static inline v8f codes8(const int8_t *p) {
#if defined(__AVX2__)
    return (v8f)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    v8c q;
    memcpy(&q, p, sizeof q);
    return __builtin_convertvector(__builtin_convertvector(q, v8i), v8f);
#endif
}
static inline lanes16 lanes_codes(const int8_t *p, float scale) {
    lanes16 v = {codes8(p) * scale, codes8(p + 8) * scale};
    return v;
}
static inline float chain_sum(lanes16 v) {
    v8f s = v.lo + v.hi; /* the tree's first level: lane j += lane j + 8 */
    for (int w = 4; w >= 1; w /= 2)
        for (int j = 0; j < w; ++j) s[j] += s[j + w];
    return s[0];
}
#endif

/* out[e] = dot(table[idx[e]], h[e / k]) for e < rows * k: the head's top candidates rescored against the
 * float32 table (models/llama.py, compute_logits). Each dot is one chain over the inputs (16 lanes, a
 * fixed tree, then the tail in order), whatever rows and k are, so a row's scores never depend on others.
 * The caller checks that every index is a row of the table. */
int gather_dot_f32(const float *table, int cols, const float *h, long rows, const int64_t *idx, int k, float *out) {
    if (cols <= 0 || k <= 0 || rows < 0) return -2;
    const long total = rows * k;
#pragma omp parallel for schedule(static) if (total > 64)
    for (long e = 0; e < total; ++e) {
        const float *t = table + idx[e] * cols, *x = h + (e / k) * cols;
        lanes16 acc = {0};
        int i = 0;
        for (; i + BLOCK <= cols; i += BLOCK) acc = lanes_madd(acc, lanes_load(t + i), lanes_load(x + i));
        float s = chain_sum(acc);
        for (; i < cols; ++i) s += t[i] * x[i];
        out[e] = s;
    }
    return 0;
}

/* Whether gather_dot_q8 beats gather_dot_f32 at this level: it needs a vector widening of int8 (AVX2,
 * AVX-512, NEON); below AVX2 on x86 it measured 10x slower than reading the float32 table. */
int gather_dot_q8_pays(void) {
#if defined(__AVX2__) || defined(__aarch64__)
    return 1;
#else
    return 0;
#endif
}

/* gather_dot_f32 over a table held as Q8_0 (an int8 code per entry, a scale per 32 entries of a row) whose
 * float32 values are exactly scale * code: the embedded model's head, stored so in its GGUF. Each 16-entry
 * piece is widened to those very float32 values and then summed exactly as gather_dot_f32 sums the float32
 * table (the same chain, the same tree), so both give the same bits, while this one reads about a quarter
 * of the bytes: what a request's logprobs cost per token (models/llama.py, exact_logits). */
#define Q8_GROUP 32
int gather_dot_q8(const int8_t *codes, const float *scales, int cols, const float *h, long rows,
                  const int64_t *idx, int k, float *out) {
    if (cols <= 0 || cols % Q8_GROUP || k <= 0 || rows < 0) return -2;
    const long total = rows * k;
    const int groups = cols / Q8_GROUP;
#pragma omp parallel for schedule(static) if (total > 64)
    for (long e = 0; e < total; ++e) {
        const int8_t *t = codes + idx[e] * cols;
        const float *sc = scales + idx[e] * groups, *x = h + (e / k) * cols;
        lanes16 acc = {0};
        for (int i = 0; i < cols; i += BLOCK) /* cols is a multiple of 32: no tail, as gather_dot_f32 has none */
            acc = lanes_madd(acc, lanes_codes(t + i, sc[i / Q8_GROUP]), lanes_load(x + i));
        out[e] = chain_sum(acc);
    }
    return 0;
}

/* out [rows, n] float32 = x [rows, k] @ W.T + bias for float32 x and W in its plain [n, k] layout: no packed
 * copy, so a head tied to the embedding table keeps sharing its memory. Every output is one dot product:
 * DOT_ROWS x DOT_COLS of them at a time, each a chain over k in vectors of VW lanes, then a fixed tree of
 * the lanes, then the tail in order. Missing rows and columns of a partial tile point at real ones and
 * write to scratch, so every output runs the same code whatever the batch. */
#define DOT_ROWS 4
#define DOT_COLS 4
static inline float lanes_sum(vf v) {
    for (int w = VW / 2; w >= 1; w /= 2)
        for (int j = 0; j < w; ++j) v[j] += v[j + w];
    return v[0];
}

int dense_linear_f32_plain(const float *x, long x_stride, int rows, int k, const float *w, const float *bias,
                           float *out, long out_stride, int n) {
    if (rows <= 0 || n <= 0 || k <= 0) return -2;
    const int col_tiles = (n + DOT_COLS - 1) / DOT_COLS, row_tiles = (rows + DOT_ROWS - 1) / DOT_ROWS;
#pragma omp parallel for schedule(static) if ((long)col_tiles * row_tiles > 1)
    for (long item = 0; item < (long)col_tiles * row_tiles; ++item) {
        const int c0 = (int)(item / row_tiles) * DOT_COLS, r0 = (int)(item % row_tiles) * DOT_ROWS;
        const float *xr[DOT_ROWS], *wr[DOT_COLS];
        float scratch = 0.f, *dst[DOT_ROWS][DOT_COLS];
        for (int r = 0; r < DOT_ROWS; ++r) xr[r] = x + (long)(r0 + r < rows ? r0 + r : r0) * x_stride;
        for (int c = 0; c < DOT_COLS; ++c) wr[c] = w + (long)(c0 + c < n ? c0 + c : c0) * k;
        for (int r = 0; r < DOT_ROWS; ++r)
            for (int c = 0; c < DOT_COLS; ++c)
                dst[r][c] = r0 + r < rows && c0 + c < n ? out + (long)(r0 + r) * out_stride + c0 + c : &scratch;
        vf acc[DOT_ROWS][DOT_COLS];
        for (int r = 0; r < DOT_ROWS; ++r)
            for (int c = 0; c < DOT_COLS; ++c) acc[r][c] = (vf){0};
        int i = 0;
        for (; i + VW <= k; i += VW) {
            vf wv[DOT_COLS], xv;
            for (int c = 0; c < DOT_COLS; ++c) memcpy(&wv[c], wr[c] + i, sizeof(vf));
            for (int r = 0; r < DOT_ROWS; ++r) {
                memcpy(&xv, xr[r] + i, sizeof xv);
                for (int c = 0; c < DOT_COLS; ++c) acc[r][c] += wv[c] * xv;
            }
        }
        for (int r = 0; r < DOT_ROWS; ++r)
            for (int c = 0; c < DOT_COLS; ++c) {
                float s = lanes_sum(acc[r][c]);
                for (int j = i; j < k; ++j) s += xr[r][j] * wr[c][j];
                *dst[r][c] = s + (bias && c0 + c < n ? bias[c0 + c] : 0.f);
            }
    }
    return 0;
}
