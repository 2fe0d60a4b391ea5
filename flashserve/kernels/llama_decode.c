/* Every decoder layer of a Llama-family model for a batch of decode rows, in one call from Python.
 *
 * Why it exists: a decode step of a small model is ~10 operators per layer on a few rows each, and the
 * Python around each call (dispatch, checks, allocations) cost as much as the arithmetic. This driver
 * runs the same operators as models/llama.py, in the same order and with the same kernels
 * (cpu_ops.c, q4_linear.c), so its rows get the very bits the Python path gives them; it only removes
 * the interpreter between them. Python checks once, when it builds the layer table, that the model is
 * one this driver covers (float32 activations, a float32 or bf16 cache, 4-bit native linears, no biases).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int q4_linear(const float *x, long x_stride, int rows, int k, const uint8_t *weights, float *out,
              long out_stride, int n);
int rms_norm_f32(const float *x, float *residual, const float *weight, float *out, long rows, int dim, float eps);
/* Declared here with void caches: the float32-cache and bf16-cache builds (cpu_ops.c) differ only in the
 * cache's element type, which the call passes through untouched. */
#define CACHE_OPS(SUF)                                                                                      \
    int rotary_store_##SUF(float *qkv, long rows, int num_heads, int num_kv_heads, int head_dim,              \
                           const int64_t *positions, const float *cos_half, const float *sin_half,           \
                           const int64_t *slots, void *key_cache, void *value_cache);                        \
    int paged_decode_##SUF(const float *q, long q_stride, const void *key_cache, const void *value_cache,    \
                           float *out, long out_stride, const int32_t *block_tables, const int32_t *context_lens, \
                           int num_seqs, int max_blocks_per_seq, int block_size, int num_heads,              \
                           int num_kv_heads, int head_dim, float scale);
CACHE_OPS(f32)
CACHE_OPS(f32_bf16)
typedef __typeof__(rotary_store_f32) *RotaryStore;
typedef __typeof__(paged_decode_f32) *PagedDecode;
int silu_mul_f32(const float *gate_up, float *out, long rows, int inter);

/* One layer's weights and cache, as laid out by Python (kernels/__init__.py, DecodeLayer). */
typedef struct {
    const uint8_t *qkv, *o, *gate_up, *down; /* q4_linear layout */
    const float *input_norm, *post_norm;
    void *key_cache, *value_cache; /* float32, or bf16 where DecodeDims.cache_bf16 */
} DecodeLayer;

typedef struct {
    int hidden, inter, num_heads, num_kv_heads, head_dim, cache_bf16;
    float eps, scale;
} DecodeDims;

/* The batch: one new token per sequence, sequence b at row b. */
typedef struct {
    const int64_t *positions, *slots;
    const int32_t *block_tables, *context_lens;
    int max_blocks, block_size;
    const float *cos_half, *sin_half;
} DecodeBatch;

#define CHECK(call)                   \
    do {                              \
        int rc_ = (call);             \
        if (rc_) { free(scratch); return rc_; } \
    } while (0)

/* x [rows, hidden]: the embeddings in, the last layer's MLP output out; residual [rows, hidden]: the
 * residual stream out (x + residual is the last layer's output, which Python normalises). 0 on success,
 * -1 out of memory, -2 a shape a kernel refused. */
int llama_decode_layers(const DecodeLayer *layers, int num_layers, const DecodeDims *d, const DecodeBatch *batch,
                        float *x, float *residual, int rows) {
    const int q_width = d->num_heads * d->head_dim, width = q_width + 2 * d->num_kv_heads * d->head_dim;
    const size_t h_size = (size_t)rows * d->hidden, qkv_size = (size_t)rows * width;
    const size_t attn_size = (size_t)rows * q_width, gu_size = (size_t)rows * 2 * d->inter;
    float *scratch = malloc(sizeof(float) * (h_size + qkv_size + attn_size + gu_size + (size_t)rows * d->inter));
    if (!scratch) return -1;
    float *h = scratch, *qkv = h + h_size, *attn = qkv + qkv_size, *gate_up = attn + attn_size;
    float *act = gate_up + gu_size;
    memcpy(residual, x, sizeof(float) * h_size); /* the first layer normalises the embeddings alone */
    const RotaryStore rotary_store = d->cache_bf16 ? rotary_store_f32_bf16 : rotary_store_f32;
    const PagedDecode paged_decode = d->cache_bf16 ? paged_decode_f32_bf16 : paged_decode_f32;
    for (int l = 0; l < num_layers; ++l) {
        const DecodeLayer *L = &layers[l];
        CHECK(rms_norm_f32(l ? x : residual, l ? residual : NULL, L->input_norm, h, rows, d->hidden, d->eps));
        CHECK(q4_linear(h, d->hidden, rows, d->hidden, L->qkv, qkv, width, width));
        CHECK(rotary_store(qkv, rows, d->num_heads, d->num_kv_heads, d->head_dim, batch->positions,
                               batch->cos_half, batch->sin_half, batch->slots, L->key_cache, L->value_cache));
        CHECK(paged_decode(qkv, width, L->key_cache, L->value_cache, attn, q_width, batch->block_tables,
                               batch->context_lens, rows, batch->max_blocks, batch->block_size, d->num_heads,
                               d->num_kv_heads, d->head_dim, d->scale));
        CHECK(q4_linear(attn, q_width, rows, q_width, L->o, x, d->hidden, d->hidden));
        CHECK(rms_norm_f32(x, residual, L->post_norm, h, rows, d->hidden, d->eps));
        CHECK(q4_linear(h, d->hidden, rows, d->hidden, L->gate_up, gate_up, 2 * d->inter, 2 * d->inter));
        CHECK(silu_mul_f32(gate_up, act, rows, d->inter));
        CHECK(q4_linear(act, d->inter, rows, d->inter, L->down, x, d->hidden, d->hidden));
    }
    free(scratch);
    return 0;
}
