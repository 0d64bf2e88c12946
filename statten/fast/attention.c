/*
 * STAtten's block-wise attention of 0/1 spikes on CPU (float32, inference), loaded by
 * statten/fast/native.py. Per batch element and head, for the steps t of each block of `chunk`
 * steps:
 *
 *     kv     = scale * sum_{t' in block} K[t']^T V[t']        [d, d]
 *     out[t] = Q[t] kv                                         [tokens, d]
 *
 * Both products are driven by the spikes: each token's V row is added to the kv rows of the K
 * channels that spiked (kv holds exact counts, integers in float32, scaled once at the end, so
 * kv equals the dense `(K^T V) * scale` bit for bit), then each query row is the sum of the kv
 * rows of its Q channels that spiked, added in channel order (a dense product may add them in
 * another order: equal up to rounding). The work is proportional to the spikes, and q, k, v are
 * read where they lie: no copies into blocks, and the output is written in the layout the
 * caller asks for.
 *
 * Layout: element (t, b, h, n, j) of q, k and v at t*step + b*batch + h*head + n*token + j
 * (channels j of a head contiguous), of out at the same with out's strides.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "parallel.h"
#include "spike_bits.h"

/* Output columns are accumulated 16 at a time in vector registers (GCC/clang vector types: one
 * AVX-512 register, or two AVX2 / four SSE ones), up to TILE_VECS vectors per pass. */
typedef float vec __attribute__((vector_size(64)));
typedef float unaligned_vec __attribute__((vector_size(64), aligned(4)));
#define LANES 16
#define TILE_VECS 4

typedef struct {
    int64_t step, batch, head, token;
} Strides;

typedef struct {
    const float *q, *k, *v;
    float *out;
    Strides in, os;
    int64_t batch, heads, tokens, dim, chunk;
    float scale;
    volatile int status; /* 0, 1: an input held another value than 0 and 1, -1: no memory */
} Attention;

/* The channels i < d at which row[i] != 0, in increasing order, into idx; returns how many, or
 * -1 if the row holds a value other than 0 and 1. */
static int64_t spike_channels(const float *row, int64_t d, int32_t *idx) {
    int64_t m = 0;
    uint64_t other = 0;
    for (int64_t base = 0; base < d; base += 64)
        for (uint64_t bits = spike_bits(row + base, d - base < 64 ? d - base : 64, &other); bits;
             bits &= bits - 1)
            idx[m++] = (int32_t)(base + __builtin_ctzll(bits));
    return other ? -1 : m;
}

/* Whether row[0, d) holds a value other than 0 and 1. */
static int not_spikes(const float *row, int64_t d) {
    uint64_t other = 0;
    for (int64_t base = 0; base < d; base += 64)
        spike_bits(row + base, d - base < 64 ? d - base : 64, &other);
    return other != 0;
}

/* Columns [j, j + LANES nv) of: out = the sum of the rows idx[0, m) of the [., d] matrix
 * `rows`, in that order, accumulated in registers. */
static inline __attribute__((always_inline)) void sum_rows_tile(
    float *out, const float *rows, const int32_t *idx, int64_t m, int64_t d, int64_t j, int nv) {
    vec acc[TILE_VECS] = {0};
    for (int64_t s = 0; s < m; s++) {
        const float *row = rows + idx[s] * d + j;
        for (int g = 0; g < nv; g++) acc[g] += *(const unaligned_vec *)(row + g * LANES);
    }
    for (int g = 0; g < nv; g++) *(unaligned_vec *)(out + j + g * LANES) = acc[g];
}

/* Columns [j, j + LANES nv) of: add x to the rows idx[0, m) of the [., d] matrix `rows`. */
static inline __attribute__((always_inline)) void add_to_rows_tile(
    float *rows, const float *x, const int32_t *idx, int64_t m, int64_t d, int64_t j, int nv) {
    vec add[TILE_VECS];
    for (int g = 0; g < nv; g++) add[g] = *(const unaligned_vec *)(x + j + g * LANES);
    for (int64_t s = 0; s < m; s++) {
        float *row = rows + idx[s] * d + j;
        for (int g = 0; g < nv; g++) *(unaligned_vec *)(row + g * LANES) += add[g];
    }
}

/* out[0, d) = the sum of the rows idx[0, m) of the [d, d] matrix `rows`, in that order. */
static void sum_rows(float *out, const float *rows, const int32_t *idx, int64_t m, int64_t d) {
    int64_t j = 0;
    for (; j + TILE_VECS * LANES <= d; j += TILE_VECS * LANES)
        sum_rows_tile(out, rows, idx, m, d, j, TILE_VECS);
    for (; j + LANES <= d; j += LANES) sum_rows_tile(out, rows, idx, m, d, j, 1);
    for (; j < d; j++) {
        float acc = 0.0f;
        for (int64_t s = 0; s < m; s++) acc += rows[idx[s] * d + j];
        out[j] = acc;
    }
}

/* Add x[0, d) to the rows idx[0, m) of the [d, d] matrix `rows`. */
static void add_to_rows(float *rows, const float *x, const int32_t *idx, int64_t m, int64_t d) {
    int64_t j = 0;
    for (; j + TILE_VECS * LANES <= d; j += TILE_VECS * LANES)
        add_to_rows_tile(rows, x, idx, m, d, j, TILE_VECS);
    for (; j + LANES <= d; j += LANES) add_to_rows_tile(rows, x, idx, m, d, j, 1);
    for (; j < d; j++)
        for (int64_t s = 0; s < m; s++) rows[idx[s] * d + j] += x[j];
}

/* kv = scale * sum over the block's tokens of k_row^T v_row, for one (block, batch, head). */
static int block_kv(const Attention *a, int64_t t0, int64_t b, int64_t h, float *kv,
                    int32_t *idx) {
    const int64_t d = a->dim;
    memset(kv, 0, d * d * sizeof(float));
    for (int64_t t = t0; t < t0 + a->chunk; t++)
        for (int64_t n = 0; n < a->tokens; n++) {
            const int64_t at = t * a->in.step + b * a->in.batch + h * a->in.head + n * a->in.token;
            const float *k = a->k + at, *v = a->v + at;
            const int64_t m = spike_channels(k, d, idx);
            if (m < 0 || not_spikes(v, d)) return 1;
            add_to_rows(kv, v, idx, m, d);
        }
    for (int64_t i = 0; i < d * d; i++) kv[i] *= a->scale;
    return 0;
}

/* out rows of the block's steps: each the sum of the kv rows of its query's spikes. */
static int block_out(const Attention *a, int64_t t0, int64_t b, int64_t h, const float *kv,
                     int32_t *idx) {
    const int64_t d = a->dim;
    for (int64_t t = t0; t < t0 + a->chunk; t++)
        for (int64_t n = 0; n < a->tokens; n++) {
            const float *q = a->q + t * a->in.step + b * a->in.batch + h * a->in.head +
                             n * a->in.token;
            float *out = a->out + t * a->os.step + b * a->os.batch + h * a->os.head +
                         n * a->os.token;
            const int64_t m = spike_channels(q, d, idx);
            if (m < 0) return 1;
            sum_rows(out, kv, idx, m, d);
        }
    return 0;
}

/* Units [begin, end) of (block, batch, head), head fastest. */
static void attention_range(void *job, int64_t begin, int64_t end) {
    Attention *a = job;
    float *kv = malloc(a->dim * a->dim * sizeof(float));
    int32_t *idx = malloc(a->dim * sizeof(int32_t));
    if (!kv || !idx) a->status = -1;
    for (int64_t unit = begin; unit < end && a->status == 0; unit++) {
        const int64_t h = unit % a->heads, b = unit / a->heads % a->batch;
        const int64_t t0 = unit / (a->heads * a->batch) * a->chunk;
        if (block_kv(a, t0, b, h, kv, idx) || block_out(a, t0, b, h, kv, idx)) a->status = 1;
    }
    free(kv);
    free(idx);
}

/* 0 on success, 1 if q, k or v holds another value than 0 and 1 (out is then unspecified),
 * -1 if out of memory. `in` and `os`: the step, batch, head and token strides of q, k, v and of
 * out. steps a multiple of chunk. */
int statten_spatiotemporal_attention(const float *q, const float *k, const float *v,
                                     const int64_t *in, float *out, const int64_t *os,
                                     int64_t steps, int64_t batch, int64_t heads, int64_t tokens,
                                     int64_t dim, int64_t chunk, float scale, int threads) {
    Attention a = {q, k, v, out, {in[0], in[1], in[2], in[3]}, {os[0], os[1], os[2], os[3]},
                   batch, heads, tokens, dim, chunk, scale, 0};
    parallel_for(attention_range, &a, steps / chunk * batch * heads, 1, 2 * chunk * tokens * dim,
                 threads);
    return a.status;
}
