/* A small C test of the native kernels without Python, for targets where PyTorch does not run here:
 * scripts/check-kernels-aarch64.sh cross-builds it for aarch64 and runs it under qemu-user (the plain-C
 * paths), and scripts/test-kernel-levels.sh runs it at each x86-64 level too.
 *
 * What it checks, on random data:
 * - dense_linear (bf16 and float32): close to a double-precision reference, and every row of a batch
 *   bit-for-bit the row computed alone (and in a batch split differently);
 * - q4_linear: close to the reference of its dequantized weights, and rows alone == rows batched;
 * - gather_dot: close to the reference, and the same bits alone and batched; gather_dot_q8 over a Q8_0
 *   table: the same bits as gather_dot over that table's float32 values;
 * - rms_norm_f32, silu_mul_f32: close to the reference; argmax_rows and top_k_rows: exact.
 * Exit status 0 when everything passes; each failure is printed.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int dense_linear_bf16(const uint16_t *x, long x_stride, int rows, int k, const uint16_t *w, const float *bias,
                      float *out, long out_stride, int n);
int dense_linear_f32(const float *x, long x_stride, int rows, int k, const float *w, const float *bias, float *out,
                     long out_stride, int n);
int gather_dot_f32(const float *table, int cols, const float *h, long rows, const int64_t *idx, int k, float *out);
int gather_dot_q8(const int8_t *codes, const float *scales, int cols, const float *h, long rows, const int64_t *idx,
                  int k, float *out);
int q4_linear(const float *x, long x_stride, int rows, int k, const uint8_t *weights, float *out, long out_stride,
              int n);
int rms_norm_f32(const float *x, float *residual, const float *weight, float *out, long rows, int dim, float eps);
int silu_mul_f32(const float *gate_up, float *out, long rows, int inter);
int argmax_rows(const float *x, long rows, int cols, int64_t *out);
int top_k_rows(const float *x, long rows, int cols, int k, int64_t *out);

static int failures = 0;
#define CHECK(cond, ...)                                                                                     \
    do {                                                                                                     \
        if (!(cond)) {                                                                                       \
            ++failures;                                                                                      \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                                                      \
            printf(__VA_ARGS__);                                                                             \
            printf("\n");                                                                                    \
        }                                                                                                    \
    } while (0)

static uint64_t rng = 88172645463325252ull;
static float frand(void) { /* uniform in [-1, 1) */
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (float)((rng >> 40) * (1.0 / (1 << 23))) - 1.f;
}
static uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
static float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static uint16_t to_fp16(float f) { /* normal, in-range values only (what the harness makes) */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    int exp = (int)((u >> 23) & 0xFF) - 127 + 15;
    return (uint16_t)(sign | (uint32_t)exp << 10 | ((u >> 13) & 0x3FFu));
}
static float from_fp16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    uint32_t bits = sign | ((exp + 112u) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
static double rel_err(const float *got, const double *ref, long n) {
    double num = 0, den = 0;
    for (long i = 0; i < n; ++i) num += (got[i] - ref[i]) * (got[i] - ref[i]), den += ref[i] * ref[i];
    return sqrt(num / (den > 0 ? den : 1));
}

/* Rows alone vs the whole batch vs the batch in two uneven parts: all the same bits. */
#define CHECK_ROWS_ALONE(NAME, CALL_ROWS, M, N, OUT)                                                         \
    do {                                                                                                     \
        float *alone = malloc(sizeof(float) * (M) * (N)), *parts = malloc(sizeof(float) * (M) * (N));        \
        for (int r = 0; r < (M); ++r) CALL_ROWS(r, 1, alone + (long)r * (N));                                \
        CALL_ROWS(0, 5, parts);                                                                              \
        CALL_ROWS(5, (M) - 5, parts + 5L * (N));                                                             \
        CHECK(!memcmp(alone, OUT, sizeof(float) * (M) * (N)), "%s: rows in a batch differ from rows alone", NAME); \
        CHECK(!memcmp(alone, parts, sizeof(float) * (M) * (N)), "%s: rows in parts differ from rows alone", NAME); \
        free(alone), free(parts);                                                                            \
    } while (0)

static void test_dense(void) {
    enum { M = 23, K = 96, N = 80 };
    static float x[M * K], w[N * K], bias[N], out[M * N], wf[N * K];
    static uint16_t xb[M * K], wb[N * K];
    static double ref[M * N];
    for (int i = 0; i < M * K; ++i) xb[i] = to_bf16(frand()), x[i] = from_bf16(xb[i]);
    for (int i = 0; i < N * K; ++i) wb[i] = to_bf16(frand() * 0.1f), w[i] = from_bf16(wb[i]);
    for (int i = 0; i < N; ++i) bias[i] = frand();
    /* packed: per block of 16 outputs, bf16 pairs [K/2][16][2]; float32 [K][16] */
    static uint16_t pb[N * K];
    for (int b = 0; b < N / 16; ++b)
        for (int kp = 0; kp < K / 2; ++kp)
            for (int o = 0; o < 16; ++o)
                for (int j = 0; j < 2; ++j) {
                    pb[(((long)b * (K / 2) + kp) * 16 + o) * 2 + j] = wb[(b * 16 + o) * K + 2 * kp + j];
                    wf[((long)b * K + 2 * kp + j) * 16 + o] = w[(b * 16 + o) * K + 2 * kp + j];
                }
    for (int r = 0; r < M; ++r)
        for (int o = 0; o < N; ++o) {
            double s = bias[o];
            for (int i = 0; i < K; ++i) s += (double)x[r * K + i] * w[o * K + i];
            ref[r * N + o] = s;
        }
    CHECK(dense_linear_bf16(xb, K, M, K, pb, bias, out, N, N) == 0, "dense_linear_bf16 refused");
    CHECK(rel_err(out, ref, M * N) < 1e-5, "dense_linear_bf16: relative error %g", rel_err(out, ref, M * N));
#define BF16_ROWS(r0, m, dst) dense_linear_bf16(xb + (long)(r0) * K, K, m, K, pb, bias, dst, N, N)
    CHECK_ROWS_ALONE("dense_linear_bf16", BF16_ROWS, M, N, out);
    CHECK(dense_linear_f32(x, K, M, K, wf, bias, out, N, N) == 0, "dense_linear_f32 refused");
    CHECK(rel_err(out, ref, M * N) < 1e-5, "dense_linear_f32: relative error %g", rel_err(out, ref, M * N));
#define F32_ROWS(r0, m, dst) dense_linear_f32(x + (long)(r0) * K, K, m, K, wf, bias, dst, N, N)
    CHECK_ROWS_ALONE("dense_linear_f32", F32_ROWS, M, N, out);
    CHECK(dense_linear_f32(x, K, M, K, wf, bias, out, N, 8) == -2, "dense_linear_f32 took 8 outputs");
}

static void test_q4(void) {
    enum { M = 19, K = 128, N = 48, G = K / 32 };
    static float x[M * K], out[M * N], wq[N * K];
    static double ref[M * N];
    static uint8_t packed[(N / 16) * G * 320];
    for (int i = 0; i < M * K; ++i) x[i] = frand();
    for (int b = 0; b < N / 16; ++b)
        for (int g = 0; g < G; ++g) {
            uint8_t *p = packed + ((long)b * G + g) * 320;
            uint16_t *sm = (uint16_t *)(p + 256);
            memset(p, 0, 256);
            for (int o = 0; o < 16; ++o) {
                sm[o] = to_fp16(0.01f + 0.005f * (frand() + 1.f));
                sm[16 + o] = to_fp16(-0.05f + 0.01f * frand());
                for (int i = 0; i < 32; ++i) {
                    int q = (int)((frand() + 1.f) * 8.f) & 15;
                    wq[(b * 16 + o) * K + g * 32 + i] = from_fp16(sm[o]) * q + from_fp16(sm[16 + o]);
                    int c = (i % 16) / 4, lane = i % 4, shift = i < 16 ? 0 : 4;
                    p[c * 64 + o * 4 + lane] |= (uint8_t)(q << shift);
                }
            }
        }
    for (int r = 0; r < M; ++r)
        for (int o = 0; o < N; ++o) {
            double s = 0;
            for (int i = 0; i < K; ++i) s += (double)x[r * K + i] * wq[o * K + i];
            ref[r * N + o] = s;
        }
    CHECK(q4_linear(x, K, M, K, packed, out, N, N) == 0, "q4_linear refused");
    CHECK(rel_err(out, ref, M * N) < 0.02, "q4_linear: relative error %g", rel_err(out, ref, M * N));
#define Q4_ROWS(r0, m, dst) q4_linear(x + (long)(r0) * K, K, m, K, packed, dst, N, N)
    CHECK_ROWS_ALONE("q4_linear", Q4_ROWS, M, N, out);
}

static void test_gather_dot(void) {
    enum { V = 50, H = 67, M = 9, KC = 4 };
    static float table[V * H], h[M * H], out[M * KC], alone[M * KC];
    static int64_t idx[M * KC];
    static double ref[M * KC];
    for (int i = 0; i < V * H; ++i) table[i] = frand();
    for (int i = 0; i < M * H; ++i) h[i] = frand();
    for (int i = 0; i < M * KC; ++i) idx[i] = (i * 7) % V;
    for (int e = 0; e < M * KC; ++e) {
        double s = 0;
        for (int i = 0; i < H; ++i) s += (double)table[idx[e] * H + i] * h[(e / KC) * H + i];
        ref[e] = s;
    }
    CHECK(gather_dot_f32(table, H, h, M, idx, KC, out) == 0, "gather_dot refused");
    CHECK(rel_err(out, ref, M * KC) < 1e-5, "gather_dot: relative error %g", rel_err(out, ref, M * KC));
    for (int r = 0; r < M; ++r) gather_dot_f32(table, H, h + r * H, 1, idx + r * KC, KC, alone + r * KC);
    CHECK(!memcmp(out, alone, sizeof out), "gather_dot: rows in a batch differ from rows alone");
}

static void test_gather_dot_q8(void) {
    enum { V = 40, H = 96, M = 5, KC = 6 };
    static float table[V * H], scales[V * H / 32], h[M * H], out[M * KC], q8[M * KC];
    static int8_t codes[V * H];
    static int64_t idx[M * KC];
    for (int g = 0; g < V * H / 32; ++g) scales[g] = from_fp16(to_fp16(0.01f + 0.02f * (frand() + 1)));
    for (int i = 0; i < V * H; ++i) {
        codes[i] = (int8_t)(int)(127 * frand());
        table[i] = (float)codes[i] * scales[i / 32];
    }
    for (int i = 0; i < M * H; ++i) h[i] = frand();
    for (int i = 0; i < M * KC; ++i) idx[i] = (i * 11) % V;
    CHECK(gather_dot_f32(table, H, h, M, idx, KC, out) == 0, "gather_dot refused");
    CHECK(gather_dot_q8(codes, scales, H, h, M, idx, KC, q8) == 0, "gather_dot_q8 refused");
    CHECK(!memcmp(out, q8, sizeof out), "gather_dot_q8: other bits than gather_dot over the same values");
    CHECK(gather_dot_q8(codes, scales, H - 16, h, M, idx, KC, q8) == -2, "gather_dot_q8: took 80 columns");
}

static void test_small_ops(void) {
    enum { M = 5, D = 64 };
    static float x[M * D], w[D], out[M * D], gu[M * 2 * D];
    static double ref[M * D];
    for (int i = 0; i < M * D; ++i) x[i] = frand() * 3;
    for (int i = 0; i < D; ++i) w[i] = frand();
    for (int r = 0; r < M; ++r) {
        double ss = 0;
        for (int i = 0; i < D; ++i) ss += (double)x[r * D + i] * x[r * D + i];
        for (int i = 0; i < D; ++i) ref[r * D + i] = x[r * D + i] / sqrt(ss / D + 1e-6) * w[i];
    }
    CHECK(rms_norm_f32(x, NULL, w, out, M, D, 1e-6f) == 0, "rms_norm refused");
    CHECK(rel_err(out, ref, M * D) < 1e-5, "rms_norm: relative error %g", rel_err(out, ref, M * D));
    for (int i = 0; i < M * 2 * D; ++i) gu[i] = frand() * 4;
    for (int r = 0; r < M; ++r)
        for (int i = 0; i < D; ++i) {
            double g = gu[r * 2 * D + i];
            ref[r * D + i] = g / (1 + exp(-g)) * gu[r * 2 * D + D + i];
        }
    CHECK(silu_mul_f32(gu, out, M, D) == 0, "silu_mul refused");
    CHECK(rel_err(out, ref, M * D) < 1e-5, "silu_mul: relative error %g", rel_err(out, ref, M * D));

    enum { C = 300 };
    static float logits[M * C];
    for (int i = 0; i < M * C; ++i) logits[i] = frand();
    logits[2 * C + 17] = logits[2 * C + 250] = 5.f; /* a tie: the lower index wins */
    int64_t am[M], top[M * 3];
    CHECK(argmax_rows(logits, M, C, am) == 0 && top_k_rows(logits, M, C, 3, top) == 0, "argmax/top_k refused");
    for (int r = 0; r < M; ++r) {
        int best = 0;
        for (int c = 1; c < C; ++c)
            if (logits[r * C + c] > logits[r * C + best]) best = c;
        CHECK(am[r] == best, "argmax_rows row %d: %ld, not %d", r, (long)am[r], best);
        CHECK(top[r * 3] == best, "top_k_rows row %d: first %ld, not %d", r, (long)top[r * 3], best);
        CHECK(logits[r * C + top[r * 3 + 1]] >= logits[r * C + top[r * 3 + 2]], "top_k_rows row %d: not sorted", r);
    }
    CHECK(am[2] == 17 && top[6] == 17 && top[7] == 250, "ties: argmax %ld, top %ld %ld", (long)am[2],
          (long)top[6], (long)top[7]);
}

int main(void) {
    test_dense();
    test_q4();
    test_gather_dot();
    test_gather_dot_q8();
    test_small_ops();
    if (failures) {
        printf("kernel harness: %d failure(s)\n", failures);
        return 1;
    }
    printf("kernel harness: all checks passed\n");
    return 0;
}
