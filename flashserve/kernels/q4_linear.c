/* 4-bit weight × 8-bit activation matmul for decode rows: out[M, N] = x[M, K] @ W.T.
 *
 * Why it exists: a decode step multiplies a handful of rows by every weight, so its cost is the weight
 * bytes read plus the instructions spent per weight. PyTorch's int4 CPU kernel widens every weight to
 * float32 and issues one FMA per 16 multiply-adds; here the weights stay bytes and AVX512-VNNI's
 * VPDPBUSD does 64 multiply-adds per instruction, as llama.cpp's Q4_1 x Q8_1 path does.
 *
 * Weights: asymmetric 4-bit per group of 32 inputs, w = scale * q + min with q in 0..15 and scale, min
 * in fp16 (GGUF Q4_1's own grid, so a Q4_1 checkpoint requantizes exactly). Layout, per block of 16
 * outputs and per group: 256 bytes of codes, then 16 fp16 scales and 16 fp16 mins. Byte
 * [c * 64 + o * 4 + i] holds q[o][4c + i] in its low nibble and q[o][16 + 4c + i] in its high nibble,
 * so one 64-byte load unpacks into two registers of "16 outputs x 4 inputs" bytes.
 *
 * Activations: each row is quantized per group of 32 to int8 (round to nearest even of x * 127 / amax).
 * A group's dot product is then exact in int32, and the float32 part is a fixed sequence per (row,
 * output): acc = fma(isum * xscale, scale, acc); acc = fma(min, xscale * sum(xq), acc). Nothing
 * depends on the other rows, so a row gets the same bits in any batch, and the portable C path (no
 * VNNI) computes the very same values.
 *
 * Without VNNI (AVX2, x86-64-v3) VPMADDUBSW and VPMADDWD make the same integer sums (a pair of products
 * is at most 2 x 15 x 128, so the 16-bit step cannot saturate) and the float32 part is the same sequence of
 * multiply and FMAs: all three paths give every row the same bits.
 *
 * Where the CPU has AMX, whole tiles of 16 rows take their group sums from one tile multiply (TDPBSUD:
 * 16 rows x 16 outputs x 32 inputs) instead of 128 VPDPBUSDs. The sums are the same integers, and the
 * float32 part the same code, so those rows get the very bits the VNNI path gives them.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define Q4_VNNI 1
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define Q4_AMX 1
#endif
#elif defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define Q4_AVX2 1 /* x86-64-v3: VPMADDUBSW + VPMADDWD give the same exact group sums, 8 outputs a register */
#endif

#define Q4_GROUP 32
#define Q4_BLOCK 16                      /* outputs per block */
#define Q4_CODE_BYTES (Q4_BLOCK * 16)    /* 16 outputs x 32 codes x 4 bits */
#define Q4_GROUP_BYTES (Q4_CODE_BYTES + 2 * Q4_BLOCK * 2)
#define Q4_ROW_TILE 8
#define Q4_PREFETCH 4 /* groups ahead */

/* One row's int8 activations for all groups, with per-group scale and scale * sum(codes). */
typedef struct {
    int8_t *q;
    float *scale;
    float *offset;
} QuantRow;

static inline float fp16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: value = man * 2^-24 */
        float f = (float)man * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Row r of x to int8 per group, with each group's scale and scale * sum(codes). */
static void quantize_row(const float *x, long x_stride, int r, int k, int8_t *q, float *scale, float *offset) {
    int groups = k / Q4_GROUP;
    for (int g = 0; g < groups; ++g) {
        const float *src = x + r * x_stride + g * Q4_GROUP;
        int8_t *dst = q + (long)r * k + g * Q4_GROUP;
        int sum = 0;
        float amax;
#ifdef Q4_VNNI
        /* The same values as the loop below: max and integer sums are exact, the product is one multiply,
         * and the conversion rounds to nearest even as nearbyintf does. */
        __m512 lo = _mm512_loadu_ps(src), hi = _mm512_loadu_ps(src + 16);
        amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
        _mm_storeu_si128((__m128i *)dst, _mm512_cvtepi32_epi8(qlo));
        _mm_storeu_si128((__m128i *)(dst + 16), _mm512_cvtepi32_epi8(qhi));
        sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
#else
        amax = 0.f;
        for (int i = 0; i < Q4_GROUP; ++i) amax = fmaxf(amax, fabsf(src[i]));
        float inv = amax > 0.f ? 127.f / amax : 0.f;
        for (int i = 0; i < Q4_GROUP; ++i) {
            int v = (int)nearbyintf(src[i] * inv);
            dst[i] = (int8_t)v;
            sum += v;
        }
#endif
        float s = amax / 127.f;
        scale[(long)r * groups + g] = s;
        offset[(long)r * groups + g] = s * (float)sum;
    }
}

#ifdef Q4_VNNI
/* The float32 part for one row and group, shared by the VNNI and AMX paths so that both give the same bits. */
static inline __m512 accumulate_group(__m512 acc, __m512i isum, float xscale, float xoffset, __m512 scale,
                                      __m512 min) {
    __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(xscale));
    acc = _mm512_fmadd_ps(t, scale, acc);
    return _mm512_fmadd_ps(min, _mm512_set1_ps(xoffset), acc);
}

/* The two registers of "16 outputs x 4 inputs" codes each 64 packed bytes hold. */
static inline void unpack_group(const uint8_t *p, __m512i w[8]) {
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    for (int c = 0; c < 4; ++c) {
        __m512i v = _mm512_loadu_si512((const void *)(p + c * 64));
        w[c] = _mm512_and_si512(v, nibble);
        w[c + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
    }
}
#endif

#ifdef Q4_AMX
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define AMX_ROWS 16

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* Linux hands out AMX state only to processes that ask; 1 once granted, -1 if refused. */
static int amx_granted(void) {
    static int state = 0;
    if (!state) state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
    return state > 0;
}

static void amx_configure(void) {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    cfg.rows[0] = AMX_ROWS, cfg.colsb[0] = 64;       /* group sums: 16 rows x 16 int32 */
    cfg.rows[1] = AMX_ROWS, cfg.colsb[1] = Q4_GROUP; /* activations: 16 rows x 32 int8 */
    cfg.rows[2] = 8, cfg.colsb[2] = 64;              /* codes: 8 quads x 16 outputs x 4 bytes */
    _tile_loadconfig(&cfg);
}

/* Every whole tile of 16 rows in [0, rows) against one block of 16 outputs; returns the rows done. Three
 * passes over the groups (unpack all codes, multiply all tiles, then the float32 part) so that no load
 * waits on a store just made: a tile store forwards to nothing, and the multiplies overlap each other. */
static inline int block_rows_amx(const uint8_t *wblock, int groups, QuantRow xr, int k, int rows, float *out,
                                 long out_stride, __m512i *codes, int32_t *sums) {
    for (int g = 0; g < groups; ++g) unpack_group(wblock + (long)g * Q4_GROUP_BYTES, codes + g * 8);
    int r0 = 0;
    for (; rows - r0 >= AMX_ROWS; r0 += AMX_ROWS) {
        for (int g = 0; g < groups; ++g) {
            _tile_loadd(2, codes + g * 8, 64); /* quad j's register is row j: the layout TDPBSUD reads */
            _tile_loadd(1, xr.q + (long)r0 * k + g * Q4_GROUP, k);
            _tile_zero(0);
            _tile_dpbsud(0, 1, 2);
            _tile_stored(0, sums + g * AMX_ROWS * Q4_BLOCK, 64);
        }
        __m512 acc[AMX_ROWS];
        for (int r = 0; r < AMX_ROWS; ++r) acc[r] = _mm512_setzero_ps();
        for (int g = 0; g < groups; ++g) {
            const uint16_t *sm = (const uint16_t *)(wblock + (long)g * Q4_GROUP_BYTES + Q4_CODE_BYTES);
            __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sm));
            __m512 min = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sm + Q4_BLOCK)));
            const int32_t *gs = sums + g * AMX_ROWS * Q4_BLOCK;
            for (int r = 0; r < AMX_ROWS; ++r) {
                long gi = (long)(r0 + r) * groups + g;
                acc[r] = accumulate_group(acc[r], _mm512_load_si512((const void *)(gs + r * Q4_BLOCK)),
                                          xr.scale[gi], xr.offset[gi], scale, min);
            }
        }
        for (int r = 0; r < AMX_ROWS; ++r) _mm512_storeu_ps(out + (long)(r0 + r) * out_stride, acc[r]);
    }
    return r0;
}
#endif

#ifdef Q4_VNNI
/* Rows [r0, r0 + n) against one block of 16 outputs; at most Q4_ROW_TILE rows. */
static inline void block_rows(const uint8_t *wblock, int groups, QuantRow xr, int k, int r0, int n,
                              float *out, long out_stride) {
    __m512 acc[Q4_ROW_TILE];
    for (int r = 0; r < n; ++r) acc[r] = _mm512_setzero_ps();
    for (int g = 0; g < groups; ++g) {
        const uint8_t *p = wblock + (long)g * Q4_GROUP_BYTES;
        /* One row's worth of work per weight byte cannot hide DRAM latency by itself: ask ahead. */
        for (int line = 0; line < Q4_GROUP_BYTES; line += 64)
            _mm_prefetch((const char *)p + Q4_PREFETCH * Q4_GROUP_BYTES + line, _MM_HINT_T0);
        __m512i w[8];
        unpack_group(p, w);
        const uint16_t *sm = (const uint16_t *)(p + Q4_CODE_BYTES);
        __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sm));
        __m512 min = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sm + Q4_BLOCK)));
        for (int r = 0; r < n; ++r) {
            const int32_t *xq = (const int32_t *)(xr.q + (long)(r0 + r) * k + g * Q4_GROUP);
            /* Two chains of four: half the latency of one chain of eight (integer sums are exact). */
            __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
            for (int j = 0; j < 4; ++j) {
                lo = _mm512_dpbusd_epi32(lo, w[j], _mm512_set1_epi32(xq[j]));
                hi = _mm512_dpbusd_epi32(hi, w[j + 4], _mm512_set1_epi32(xq[j + 4]));
            }
            long gi = (long)(r0 + r) * groups + g;
            acc[r] = accumulate_group(acc[r], _mm512_add_epi32(lo, hi), xr.scale[gi], xr.offset[gi], scale, min);
        }
    }
    for (int r = 0; r < n; ++r) _mm512_storeu_ps(out + (long)(r0 + r) * out_stride, acc[r]);
}
#elif defined(Q4_AVX2)
/* Rows [r0, r0 + n) against one block of 16 outputs (two registers of 8); at most Q4_ROW_TILE rows. */
static inline void block_rows(const uint8_t *wblock, int groups, QuantRow xr, int k, int r0, int n,
                              float *out, long out_stride) {
    __m256 acc[Q4_ROW_TILE][2];
    for (int r = 0; r < n; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (int g = 0; g < groups; ++g) {
        const uint8_t *p = wblock + (long)g * Q4_GROUP_BYTES;
        for (int line = 0; line < Q4_GROUP_BYTES; line += 64)
            _mm_prefetch((const char *)p + Q4_PREFETCH * Q4_GROUP_BYTES + line, _MM_HINT_T0);
        __m256i w[2][8]; /* [half of the outputs][c, then c + 4 for the high nibbles] */
        for (int h = 0; h < 2; ++h)
            for (int c = 0; c < 4; ++c) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(p + c * 64 + h * 32));
                w[h][c] = _mm256_and_si256(v, nibble);
                w[h][c + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
            }
        const uint16_t *sm = (const uint16_t *)(p + Q4_CODE_BYTES);
        __m256 scale[2], min[2];
        for (int h = 0; h < 2; ++h) {
            scale[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sm + 8 * h)));
            min[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sm + Q4_BLOCK + 8 * h)));
        }
        for (int r = 0; r < n; ++r) {
            const int32_t *xq = (const int32_t *)(xr.q + (long)(r0 + r) * k + g * Q4_GROUP);
            long gi = (long)(r0 + r) * groups + g;
            const __m256 xs = _mm256_set1_ps(xr.scale[gi]), xo = _mm256_set1_ps(xr.offset[gi]);
            for (int h = 0; h < 2; ++h) {
                __m256i isum = _mm256_setzero_si256();
                for (int j = 0; j < 8; ++j) {
                    __m256i pairs = _mm256_maddubs_epi16(w[h][j], _mm256_set1_epi32(xq[j]));
                    isum = _mm256_add_epi32(isum, _mm256_madd_epi16(pairs, ones));
                }
                /* accumulate_group's sequence: the same bits as the VNNI path */
                __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(isum), xs);
                acc[r][h] = _mm256_fmadd_ps(t, scale[h], acc[r][h]);
                acc[r][h] = _mm256_fmadd_ps(min[h], xo, acc[r][h]);
            }
        }
    }
    for (int r = 0; r < n; ++r)
        for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + (long)(r0 + r) * out_stride + 8 * h, acc[r][h]);
}
#else
/* Portable (SSE2, NEON, ...): GCC vector extensions, one 16-lane vector for the block's 16 outputs. A 32-bit
 * lane of a 64-byte row of codes is one output's 4 bytes, so input 4c + i is the nibble at bit 8i and input
 * 16 + 4c + i the one at bit 8i + 4. The integer sums are exact; the float32 part is accumulate_group's
 * sequence (fused where the level has FMA). Compiled without reassociation, so every row runs the one
 * sequence whatever the tile. */
#pragma GCC push_options
#pragma GCC optimize("no-associative-math")
typedef int32_t q4_v16i __attribute__((vector_size(64)));
typedef uint32_t q4_v16u __attribute__((vector_size(64)));
typedef float q4_v16f __attribute__((vector_size(64)));

static void block_rows(const uint8_t *wblock, int groups, QuantRow xr, int k, int r0, int n, float *out,
                       long out_stride) {
    q4_v16f acc[Q4_ROW_TILE];
    for (int r = 0; r < n; ++r) acc[r] = (q4_v16f){0};
    for (int g = 0; g < groups; ++g) {
        const uint8_t *p = wblock + (long)g * Q4_GROUP_BYTES;
        const uint16_t *sm = (const uint16_t *)(p + Q4_CODE_BYTES);
        q4_v16u lanes[4];
        memcpy(lanes, p, sizeof lanes);
        q4_v16f scale, min;
        for (int o = 0; o < Q4_BLOCK; ++o) scale[o] = fp16_to_f32(sm[o]), min[o] = fp16_to_f32(sm[Q4_BLOCK + o]);
        for (int r = 0; r < n; ++r) {
            const int8_t *xq = xr.q + (long)(r0 + r) * k + g * Q4_GROUP;
            q4_v16i isum = {0};
            for (int c = 0; c < 4; ++c)
                for (int i = 0; i < 4; ++i) {
                    q4_v16i lo = (q4_v16i)((lanes[c] >> (8 * i)) & 15u), hi = (q4_v16i)((lanes[c] >> (8 * i + 4)) & 15u);
                    isum += lo * (int32_t)xq[4 * c + i] + hi * (int32_t)xq[16 + 4 * c + i];
                }
            long gi = (long)(r0 + r) * groups + g;
            q4_v16f t = __builtin_convertvector(isum, q4_v16f) * xr.scale[gi];
            acc[r] = t * scale + acc[r];
            acc[r] = min * xr.offset[gi] + acc[r];
        }
    }
    for (int r = 0; r < n; ++r) memcpy(out + (long)(r0 + r) * out_stride, &acc[r], sizeof acc[r]);
}
#pragma GCC pop_options
#endif

/* x [rows, k] (row stride x_stride), weights packed as described above for n outputs; out [rows, n]
 * (row stride out_stride). Returns -2 when the shape is not one this kernel takes, -1 when out of
 * memory, 0 on success. */
int q4_linear(const float *x, long x_stride, int rows, int k, const uint8_t *weights, float *out,
              long out_stride, int n) {
    if (k % Q4_GROUP || n % Q4_BLOCK || rows <= 0) return -2;
    int groups = k / Q4_GROUP;
    int8_t *q = malloc((size_t)rows * k + 2 * sizeof(float) * (size_t)rows * groups);
    if (!q) return -1;
    /* The floats follow rows * k int8 codes, a multiple of 32 bytes: they stay aligned. */
    float *scales = (float *)(q + (size_t)rows * k);
    QuantRow xr = {q, scales, scales + (size_t)rows * groups};
    int blocks = n / Q4_BLOCK;
#ifdef Q4_AMX
    const int amx = rows >= AMX_ROWS && amx_granted();
#else
    const int amx = 0;
    (void)amx;
#endif
#pragma omp parallel
    {
#ifdef Q4_AMX
        /* Per thread: the tile configuration, and the unpacked codes and group sums of one block. */
        __m512i *codes = NULL;
        int32_t *sums = NULL;
        if (amx) { /* without its scratch a thread leaves every row to the VNNI path: the same bits */
            amx_configure();
            codes = aligned_alloc(64, sizeof(__m512i) * 8 * (size_t)groups);
            sums = aligned_alloc(64, sizeof(int32_t) * AMX_ROWS * Q4_BLOCK * (size_t)groups);
        }
#endif
#pragma omp for schedule(static) /* rows to int8 inside the region: one fork, and both cores */
        for (int r = 0; r < rows; ++r) quantize_row(x, x_stride, r, k, xr.q, xr.scale, xr.offset);
#pragma omp for schedule(dynamic, 4) /* a thread the OS preempts (the HTTP loop shares the cores) leaves its blocks to the others */
        for (int b = 0; b < blocks; ++b) {
            const uint8_t *wblock = weights + (long)b * groups * Q4_GROUP_BYTES;
            int r0 = 0;
#ifdef Q4_AMX
            if (amx && codes && sums) r0 = block_rows_amx(wblock, groups, xr, k, rows, out + b * Q4_BLOCK, out_stride,
                                                          codes, sums);
#endif
            for (; r0 < rows; r0 += Q4_ROW_TILE) {
                int tile = rows - r0 < Q4_ROW_TILE ? rows - r0 : Q4_ROW_TILE;
                block_rows(wblock, groups, xr, k, r0, tile, out + b * Q4_BLOCK, out_stride);
            }
        }
#ifdef Q4_AMX
        if (amx) _tile_release();
        free(codes);
        free(sums);
#endif
    }
    free(q);
    return 0;
}
