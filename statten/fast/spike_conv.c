/*
 * Spike-driven convolution on CPU (float32), loaded by statten/fast/native.py: the forward pass
 * and the weight gradient, the two products of a convolution that multiply by its input.
 *
 * A spiking layer's input is 0 or 1 and mostly 0. Instead of multiplying every input by every
 * weight (a dense convolution), each output adds up the weights of the inputs that spiked: for
 * each output position and tile of output channels, over the kernel taps, over the list of input
 * channels that spiked at the tapped position. A spike count (a sum of spike tensors, as
 * residual connections make: an integer up to MAX_COUNT) is listed as that many spikes. The
 * weight gradient adds, for each spike and tap, the output gradient at the tapped output
 * position into the weight row of the spike's channel.
 * The work is proportional to the number of spikes; the results equal the dense ones up to the
 * order of the additions.
 *
 * Layouts: input, output and output gradient each contiguous ([n][c][h][w]) or channels-last
 * ([n][h][w][c]), so that no caller converts them; weights [kh][kw][cin][cout], bias [cout] or
 * null; stride 1, zero padding `pad` on every side; cout a multiple of 16.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "parallel.h"
#include "spike_bits.h"

/* Output channels are accumulated 16 at a time in vector registers (GCC/clang vector types: one
 * AVX-512 register, or two AVX2 / four SSE ones): the weight gradient VECS vectors per pass (4
 * beat 8 and 2 on the CIFAR-10 2-512 layers on a Sapphire Rapids Xeon), the output up to
 * OUTPUT_VECS, as many as keep a tile's weights (kh kw cin of its rows) within TILE_BYTES, so
 * that they stay in L2 while the output rows sweep over them (8 vectors beat 4 by 15-25 % on the
 * 32x32 patch stages, whose tiles are 0.3-0.6 MB, and lose by 50 % where they would be 1.2-2.4
 * MB: benchmarks/spike_conv.py). */
typedef float vec __attribute__((vector_size(64)));
typedef float unaligned_vec __attribute__((vector_size(64), aligned(4)));
typedef int32_t ivec __attribute__((vector_size(64)));
#define LANES 16
#define VECS 4
#define OUTPUT_VECS 8
#define TILE_BYTES (640 * 1024)

/* Output columns handled per pass when the output is not channels-last: their results are
 * gathered in a buffer and written one channel at a time. */
#define COLUMNS 64

/* A tensor [n][channels][positions] with element strides: contiguous (NCHW: stride_channel =
 * positions, stride_position = 1) or channels-last (stride_channel = 1, stride_position =
 * channels). */
typedef struct {
    int64_t image, channel, position;
} Strides;

typedef struct {
    const float *x, *weight, *bias;
    float *out; /* the output, or the weight gradient */
    const float *grad_out;
    Strides xs, os; /* of x; of the output or the output gradient */
    int64_t n, h, w, cin, cout, kh, kw, pad, oh, ow;
    int64_t *offsets; /* spikes of position p: channels[offsets[p] .. offsets[p + 1]) */
    int32_t *channels;
    uint64_t *masks; /* while listing: the spiking channels of each position as bits */
    volatile int other_found; /* while listing: a position held a value that is not a count */
    volatile int out_of_memory; /* set by a thread that could not allocate its buffer */
    int64_t steps; /* > 0: the output is the spikes of a LIF over the images t * n / steps + b */
    float v_threshold, tau;
    int64_t pool_k, pool_s, pool_p; /* pool_k > 0: those spikes max-pooled (kernel, stride, pad) */
    int64_t pool_first;               /* instead: the LIF fed the max-pooled sums */
    int64_t poh, pow;                 /* the pooled grid */
} Conv;

/* Input positions are scanned in blocks, channel by channel, so that both layouts read memory
 * in order or within a few cache lines. */
#define SCAN 64

/* The largest spike count listed (as that many spikes); inputs holding other values decline. */
#define MAX_COUNT 255

/* How many spikes the value v counts: v itself for an integer in [0, MAX_COUNT], else -1. */
static inline int64_t spike_count(float v) {
    return v >= 0.0f && v <= (float)MAX_COUNT && v == (float)(int32_t)v ? (int64_t)v : -1;
}

/* Channel i of the input position at base. */
static inline float input_at(const Conv *c, const float *base, int64_t i) {
    return base[i * c->xs.channel];
}

/* Where channel 0 of input positions [start, start + m) lies. */
static void scan_bases(const Conv *c, int64_t start, int64_t m, const float **base) {
    const int64_t positions = c->h * c->w;
    for (int64_t j = 0; j < m; j++) {
        const int64_t image = (start + j) / positions, position = (start + j) % positions;
        base[j] = c->x + image * c->xs.image + position * c->xs.position;
    }
}

/* The spiking channels of each input position as bits (c->masks: `words` words per position),
 * read once from x: each channels-last position's channels 64 at a time (contiguous), or
 * contiguous-layout positions SCAN at a time, channel by channel. c->offsets[p + 1] gets the
 * number of spikes at p (counts included), or -1 where p holds a value that is not a count. */
static void mask_range(void *arg, int64_t begin, int64_t end) {
    Conv *c = arg;
    const int64_t words = (c->cin + 63) / 64;
    for (int64_t start = begin; start < end && !c->other_found; start += SCAN) {
        const int64_t m = end - start < SCAN ? end - start : SCAN;
        uint64_t *masks = c->masks + start * words, other[SCAN] = {0};
        const float *base[SCAN];
        scan_bases(c, start, m, base);
        if (c->xs.channel == 1) {
            for (int64_t j = 0; j < m; j++)
                for (int64_t k = 0; k < words; k++) {
                    const int64_t count = c->cin - 64 * k < 64 ? c->cin - 64 * k : 64;
                    masks[j * words + k] = spike_bits(base[j] + 64 * k, count, &other[j]);
                }
        } else {
            memset(masks, 0, m * words * sizeof(uint64_t));
            for (int64_t i = 0; i < c->cin; i++)
                for (int64_t j = 0; j < m; j++) {
                    const float v = base[j][i * c->xs.channel];
                    const uint64_t nonzero = v != 0.0f;
                    masks[j * words + i / 64] |= nonzero << (i % 64);
                    other[j] |= nonzero & (v != 1.0f);
                }
        }
        for (int64_t j = 0; j < m; j++) {
            int64_t spikes = 0;
            for (int64_t k = 0; k < words; k++) {
                if (!other[j]) {
                    spikes += __builtin_popcountll(masks[j * words + k]);
                    continue;
                }
                for (uint64_t bits = masks[j * words + k]; bits && spikes >= 0; bits &= bits - 1) {
                    const int64_t channel = 64 * k + __builtin_ctzll(bits);
                    const int64_t count = spike_count(input_at(c, base[j], channel));
                    spikes = count < 0 ? -1 : spikes + count;
                }
            }
            c->offsets[start + j + 1] = spikes;
            if (spikes < 0) c->other_found = 1;
        }
    }
}

/* The channel lists of positions [begin, end), from their bits; a channel that holds a count
 * is listed that many times. */
static void list_range(void *arg, int64_t begin, int64_t end) {
    const Conv *c = arg;
    const int64_t words = (c->cin + 63) / 64;
    for (int64_t p = begin; p < end; p++) {
        const uint64_t *masks = c->masks + p * words;
        int32_t *next = c->channels + c->offsets[p];
        int64_t ones = 0;
        for (int64_t k = 0; k < words; k++) ones += __builtin_popcountll(masks[k]);
        const float *base = NULL;
        if (ones != c->offsets[p + 1] - c->offsets[p]) scan_bases(c, p, 1, &base);
        for (int64_t k = 0; k < words; k++)
            for (uint64_t bits = masks[k]; bits; bits &= bits - 1) {
                const int32_t channel = (int32_t)(64 * k + __builtin_ctzll(bits));
                const int64_t count = base ? spike_count(input_at(c, base, channel)) : 1;
                for (int64_t i = 0; i < count; i++) *next++ = channel;
            }
    }
}

/* The outputs at one position, channels [c0, c0 + V * LANES): bias plus, over the kernel taps,
 * the weights of the channels that spiked at the tapped input position. */
static inline __attribute__((always_inline)) void output_tile(const Conv *c, int64_t image,
                                                              int64_t oy, int64_t ox, int64_t c0,
                                                              float *out, const int V) {
    vec acc[OUTPUT_VECS];
    for (int v = 0; v < V; v++)
        acc[v] = c->bias ? *(const unaligned_vec *)(c->bias + c0 + v * LANES) : (vec){0};
    for (int64_t ky = 0; ky < c->kh; ky++) {
        const int64_t iy = oy + ky - c->pad;
        if (iy < 0 || iy >= c->h) continue;
        for (int64_t kx = 0; kx < c->kw; kx++) {
            const int64_t ix = ox + kx - c->pad;
            if (ix < 0 || ix >= c->w) continue;
            const int64_t p = (image * c->h + iy) * c->w + ix;
            const float *tap = c->weight + (ky * c->kw + kx) * c->cin * c->cout + c0;
            for (int64_t q = c->offsets[p]; q < c->offsets[p + 1]; q++) {
                const float *row = tap + (int64_t)c->channels[q] * c->cout;
                for (int v = 0; v < V; v++) acc[v] += *(const unaligned_vec *)(row + v * LANES);
            }
        }
    }
    for (int v = 0; v < V; v++) *(unaligned_vec *)(out + v * LANES) = acc[v];
}

/* Output channels [c0, c0 + V * LANES) of output rows [begin, end) of the n * oh rows: written
 * in place when the output is channels-last, else gathered per COLUMNS columns and written one
 * channel at a time. */
static inline __attribute__((always_inline)) void channel_tile(const Conv *c, int64_t begin,
                                                               int64_t end, int64_t c0,
                                                               const int V) {
    float buffer[COLUMNS * OUTPUT_VECS * LANES];
    for (int64_t row = begin; row < end; row++) {
        const int64_t image = row / c->oh, oy = row % c->oh;
        float *out = c->out + image * c->os.image + c0 * c->os.channel;
        for (int64_t ox0 = 0; ox0 < c->ow; ox0 += COLUMNS) {
            const int64_t m = c->ow - ox0 < COLUMNS ? c->ow - ox0 : COLUMNS;
            for (int64_t j = 0; j < m; j++) {
                const int64_t position = oy * c->ow + ox0 + j;
                float *target = c->os.channel == 1 ? out + position * c->os.position
                                                   : buffer + j * V * LANES;
                output_tile(c, image, oy, ox0 + j, c0, target, V);
            }
            if (c->os.channel == 1) continue;
            for (int64_t k = 0; k < V * LANES; k++) {
                float *line = out + k * c->os.channel + (oy * c->ow + ox0) * c->os.position;
                for (int64_t j = 0; j < m; j++)
                    line[j * c->os.position] = buffer[j * V * LANES + k];
            }
        }
    }
}

/* One LIF step on 16 potentials v fed x, as lif.c's spikes_range computes it (the same IEEE
 * operations in the same order): H = V + (X - V) / tau, spike where H >= v_th, V = 0 there and
 * H elsewhere. Returns the spikes. */
static inline vec lif_step(vec x, vec *v, float tau, float v_threshold) {
    const vec h = *v + (x - *v) / tau;
    const ivec fire = h >= v_threshold;
    *v = (vec)((ivec)h & ~fire);
    return (vec)((ivec)((vec){0} + 1.0f) & fire);
}

/* As channel_tile, for a channels-last output that is to be the spikes of a LIF over the steps
 * images t * batch + b of each position (rows [begin, end) of the batch * oh rows): each tile's
 * sums, still in L1, are replaced by its spikes as soon as they are in, instead of in a second
 * pass over the whole output. */
static inline __attribute__((always_inline)) void lif_channel_tile(const Conv *c, int64_t begin,
                                                                   int64_t end, int64_t c0,
                                                                   const int V) {
    const int64_t batch = c->n / c->steps;
    for (int64_t row = begin; row < end; row++) {
        const int64_t b = row / c->oh, oy = row % c->oh;
        for (int64_t ox = 0; ox < c->ow; ox++) {
            vec v[OUTPUT_VECS];
            for (int g = 0; g < V; g++) v[g] = (vec){0};
            for (int64_t t = 0; t < c->steps; t++) {
                const int64_t image = t * batch + b;
                float *out =
                    c->out + image * c->os.image + (oy * c->ow + ox) * c->os.position + c0;
                output_tile(c, image, oy, ox, c0, out, V);
                for (int g = 0; g < V; g++) {
                    unaligned_vec *sums = (unaligned_vec *)(out + g * LANES);
                    *sums = lif_step(*sums, &v[g], c->tau, c->v_threshold);
                }
            }
        }
    }
}

/* Conv output row oy of sample b, every step and column, channels [c0, c0 + V * LANES), into
 * rows[t][oy % pool_k][ox] (V * LANES floats each): the sums, or (unless pool_first) the LIF's
 * spikes of them. */
static inline __attribute__((always_inline)) void pooled_row(const Conv *c, int64_t b, int64_t oy,
                                                             int64_t c0, float *rows,
                                                             const int V) {
    const int64_t batch = c->n / c->steps, tile = V * LANES;
    for (int64_t ox = 0; ox < c->ow; ox++) {
        vec v[OUTPUT_VECS];
        for (int g = 0; g < V; g++) v[g] = (vec){0};
        for (int64_t t = 0; t < c->steps; t++) {
            float *out = rows + ((t * c->pool_k + oy % c->pool_k) * c->ow + ox) * tile;
            output_tile(c, t * batch + b, oy, ox, c0, out, V);
            if (c->pool_first) continue;
            for (int g = 0; g < V; g++) {
                unaligned_vec *sums = (unaligned_vec *)(out + g * LANES);
                *sums = lif_step(*sums, &v[g], c->tau, c->v_threshold);
            }
        }
    }
}

/* As lif_channel_tile, with the spikes max-pooled (or, with pool_first, the LIF fed the pooled
 * sums): rows [begin, end) of the batch * poh pooled rows. The conv rows that a pooled row's
 * windows cover are formed into `rows` (steps * pool_k rows of the tile, per thread) and kept
 * for the next pooled row, whose windows overlap them, so that neither the full-size output nor
 * a second pass over it is ever written. The maximum is taken in the windows' row-major order
 * with torch's rule (a larger value or a NaN replaces it), so it is torch's to the bit. */
static inline __attribute__((always_inline)) void pooled_lif_channel_tile(const Conv *c,
                                                                          int64_t begin,
                                                                          int64_t end, int64_t c0,
                                                                          float *rows,
                                                                          const int V) {
    const int64_t batch = c->n / c->steps, tile = V * LANES;
    int64_t sample = -1, next_row = 0; /* rows of `sample` before next_row are in `rows` */
    for (int64_t row = begin; row < end; row++) {
        const int64_t b = row / c->poh, py = row % c->poh;
        const int64_t top = py * c->pool_s - c->pool_p;
        const int64_t lo = top < 0 ? 0 : top, hi = top + c->pool_k < c->oh ? top + c->pool_k : c->oh;
        if (b != sample || next_row < lo) next_row = lo;
        sample = b;
        for (; next_row < hi; next_row++) pooled_row(c, b, next_row, c0, rows, V);
        for (int64_t px = 0; px < c->pow; px++) {
            const int64_t left = px * c->pool_s - c->pool_p;
            const int64_t x_lo = left < 0 ? 0 : left;
            const int64_t x_hi = left + c->pool_k < c->ow ? left + c->pool_k : c->ow;
            vec v[OUTPUT_VECS];
            for (int g = 0; g < V; g++) v[g] = (vec){0};
            for (int64_t t = 0; t < c->steps; t++) {
                vec m[OUTPUT_VECS];
                for (int g = 0; g < V; g++) m[g] = (vec){0} - __builtin_inff();
                for (int64_t oy = lo; oy < hi; oy++)
                    for (int64_t ox = x_lo; ox < x_hi; ox++) {
                        const float *in =
                            rows + ((t * c->pool_k + oy % c->pool_k) * c->ow + ox) * tile;
                        for (int g = 0; g < V; g++) {
                            const vec value = *(const unaligned_vec *)(in + g * LANES);
                            const ivec above = (value > m[g]) | (value != value); /* NaN */
                            m[g] = (vec)(((ivec)value & above) | ((ivec)m[g] & ~above));
                        }
                    }
                float *out = c->out + (t * batch + b) * c->os.image +
                             (py * c->pow + px) * c->os.position + c0;
                for (int g = 0; g < V; g++)
                    *(unaligned_vec *)(out + g * LANES) =
                        c->pool_first ? lif_step(m[g], &v[g], c->tau, c->v_threshold) : m[g];
            }
        }
    }
}

/* Output channels [c0, c0 + V * LANES) of output rows [begin, end): the sums, their spikes, or
 * those pooled (`rows`: the pooled tile's buffer). */
static inline __attribute__((always_inline)) void output_channels(const Conv *c, int64_t begin,
                                                                  int64_t end, int64_t c0,
                                                                  float *rows, const int V) {
    if (c->pool_k)
        pooled_lif_channel_tile(c, begin, end, c0, rows, V);
    else if (c->steps)
        lif_channel_tile(c, begin, end, c0, V);
    else
        channel_tile(c, begin, end, c0, V);
}

/* Output rows [begin, end) (cout is a multiple of LANES), one tile of output channels at a time
 * so that the tile's weights stay in cache while the rows sweep over them. */
static void conv_range(void *arg, int64_t begin, int64_t end) {
    Conv *c = arg;
    const int64_t row_bytes = c->kh * c->kw * c->cin * LANES * (int64_t)sizeof(float);
    float *rows = NULL;
    if (c->pool_k) {
        rows = malloc(c->steps * c->pool_k * c->ow * OUTPUT_VECS * LANES * sizeof(float));
        if (!rows) {
            c->out_of_memory = 1;
            return;
        }
    }
    int64_t c0 = 0;
    if (OUTPUT_VECS * row_bytes <= TILE_BYTES)
        for (; c0 + OUTPUT_VECS * LANES <= c->cout; c0 += OUTPUT_VECS * LANES)
            output_channels(c, begin, end, c0, rows, OUTPUT_VECS);
    for (; c0 + VECS * LANES <= c->cout; c0 += VECS * LANES)
        output_channels(c, begin, end, c0, rows, VECS);
    for (; c0 < c->cout; c0 += LANES) output_channels(c, begin, end, c0, rows, 1);
    free(rows);
}

/* A layer whose input is far denser than its crossover would read all of it only to decline:
 * one block of SCAN positions in every SAMPLE is read first, and an input that is not counts
 * there (status 1), or that has more than SAMPLE_MARGIN times max_density spikes per element
 * there (status 2), is declined on that. Inputs with fewer than SAMPLED_BLOCKS such blocks (2048
 * positions) are not sampled; the full pass stops at the first block holding a value that is not
 * a count. (A
 * threshold of 16 blocks let the 8x8 layers of CIFAR-10 2-512, 4096 positions, read all of their
 * input before declining: 12 declines, 16 ms a fast inference pass.) */
#define SAMPLE 16
#define SAMPLED_BLOCKS 2
#define SAMPLE_MARGIN 1.25

static int sampled_status(const Conv *c, double max_density) {
    const int64_t positions = c->n * c->h * c->w;
    if (positions < SCAN * SAMPLE * SAMPLED_BLOCKS) return 0;
    int64_t spikes = 0, seen = 0;
    const float *base[SCAN];
    for (int64_t start = 0; start + SCAN <= positions; start += SCAN * SAMPLE) {
        scan_bases(c, start, SCAN, base);
        for (int64_t i = 0; i < c->cin; i++) {
            for (int64_t j = 0; j < SCAN; j++) {
                const int64_t count = spike_count(input_at(c, base[j], i));
                if (count < 0) return 1;
                spikes += count;
            }
        }
        seen += SCAN;
    }
    return (double)spikes > SAMPLE_MARGIN * max_density * (double)(seen * c->cin) ? 2 : 0;
}

/* The spike lists of c->x (c->offsets, c->channels; the caller frees both when this returns 0);
 * otherwise the status of statten_spike_conv2d, nothing allocated. */
static int list_spikes(Conv *c, double max_density, int threads) {
    const int64_t positions = c->n * c->h * c->w;
    const int sampled = sampled_status(c, max_density);
    if (sampled) return sampled;
    c->offsets = malloc((positions + 1) * sizeof(int64_t));
    c->masks = malloc(positions * ((c->cin + 63) / 64) * sizeof(uint64_t));
    int status = c->offsets && c->masks ? 0 : -1;
    if (status == 0) parallel_for(mask_range, c, positions, 256, c->cin, threads);
    if (status == 0 && c->other_found) status = 1;
    for (int64_t p = 0; p < positions && status == 0; p++) {
        if (c->offsets[p + 1] < 0) status = 1;
        else c->offsets[p + 1] += p ? c->offsets[p] : 0;
    }
    const int64_t spikes = status == 0 ? c->offsets[positions] : 0;
    if (status == 0 && (double)spikes > max_density * (double)(positions * c->cin)) status = 2;
    if (status == 0) c->channels = malloc((spikes > 0 ? spikes : 1) * sizeof(int32_t));
    if (status == 0 && !c->channels) status = -1;
    if (status == 0) {
        c->offsets[0] = 0;
        parallel_for(list_range, c, positions, 256, c->cin, threads);
    }
    free(c->masks);
    if (status) free(c->offsets);
    return status;
}

/*
 * out = conv2d(x, weight) + bias; x and out each contiguous or channels-last (their strides as
 * [image, channel, position]). With steps > 0 (n a multiple of it, out channels-last), out is
 * instead the spikes of a LIF (tau, v_threshold, hard reset to 0) fed that output over the
 * images t * n / steps + b, t = 0 .. steps - 1, of each b: bit for bit lif.c's spikes of the
 * output. pool[0] > 0 (with steps) max-pools those spikes, kernel pool[0], stride pool[1],
 * padding pool[2], into out (the pooled grid); with pool[3] the LIF is fed the max-pooled output
 * instead. x holds spikes or spike counts. Returns 0 when
 * done, 1 (out untouched) when x holds a value that is not a count, 2 when x counts more than
 * max_density spikes per element (the dense convolution is then faster), 3 when cout is not a
 * multiple of 16 or the LIF's or pool's layout does not hold, -1 when out of memory.
 */
int statten_spike_conv2d(const float *x, const int64_t *x_strides, int64_t n, int64_t h,
                         int64_t w, int64_t cin, const float *weight, const float *bias,
                         int64_t cout, int64_t kh, int64_t kw, int64_t pad, float *out,
                         const int64_t *out_strides, double max_density, int64_t steps,
                         float v_threshold, float tau, const int64_t *pool, int threads) {
    if (cout % LANES || (steps && (n % steps || out_strides[1] != 1))) return 3;
    if (pool[0] && (!steps || pool[1] < 1 || pool[2] < 0 || 2 * pool[2] > pool[0])) return 3;
    Conv c = {x, weight, bias, out, 0,
              {x_strides[0], x_strides[1], x_strides[2]},
              {out_strides[0], out_strides[1], out_strides[2]},
              n, h, w, cin, cout, kh, kw, pad, h + 2 * pad - kh + 1, w + 2 * pad - kw + 1, 0, 0};
    c.steps = steps;
    c.v_threshold = v_threshold;
    c.tau = tau;
    c.pool_k = pool[0];
    c.pool_s = pool[1];
    c.pool_p = pool[2];
    c.pool_first = pool[3];
    if (c.pool_k) {
        c.poh = (c.oh + 2 * c.pool_p - c.pool_k) / c.pool_s + 1;
        c.pow = (c.ow + 2 * c.pool_p - c.pool_k) / c.pool_s + 1;
        if (c.poh < 1 || c.pow < 1) return 3;
    }
    const int status = list_spikes(&c, max_density, threads);
    if (status) return status;
    const int64_t rows = c.pool_k ? c.poh : c.oh;
    /* per row: its images and conv rows, times the vector adds of each output position */
    const double spikes_per_position = (double)c.offsets[n * h * w] / (double)(n * h * w);
    const int64_t row_work = (steps ? steps : 1) * (c.pool_k ? c.pool_s : 1) * c.ow * cout /
                             LANES * (int64_t)(1.0 + kh * kw * spikes_per_position);
    parallel_for(conv_range, &c, (steps ? n / steps : n) * rows, 1, row_work, threads);
    free(c.channels);
    free(c.offsets);
    return c.out_of_memory ? -1 : 0;
}

/* A spiking MLP's two pointwise layers in one pass: for each position of a sample, step by step,
 * the hidden layer's sums (c: weight [cin][hidden], bias) feed its LIF, whose spikes, listed from
 * their bits, feed the second layer's sums (weight2 [hidden][cout2], bias2) and LIF, whose spikes
 * are written. The hidden spikes never leave the cache: the hidden layer, often 4x wider than the
 * input and output, is neither written nor read back. */
typedef struct {
    Conv c; /* the hidden layer, its input listed; steps, tau, v_threshold: its LIF */
    const float *weight2, *bias2;
    int64_t cout2;
    float v_threshold2;
    volatile int out_of_memory;
} Mlp;

/* Sums of the listed inputs of position p over channels [c0, c0 + V * LANES) of a layer
 * (weight rows of `width` floats, bias), fed to the LIF whose potentials are v: the spikes go to
 * out. */
static inline __attribute__((always_inline)) void mlp_tile(const float *weight, const float *bias,
                                                           int64_t width, const int32_t *inputs,
                                                           int64_t count, int64_t c0, float *v,
                                                           float *out, float tau,
                                                           float v_threshold, const int V) {
    vec acc[OUTPUT_VECS];
    for (int g = 0; g < V; g++)
        acc[g] = bias ? *(const unaligned_vec *)(bias + c0 + g * LANES) : (vec){0};
    for (int64_t q = 0; q < count; q++) {
        const float *row = weight + (int64_t)inputs[q] * width + c0;
        for (int g = 0; g < V; g++) acc[g] += *(const unaligned_vec *)(row + g * LANES);
    }
    for (int g = 0; g < V; g++) {
        vec potential = *(unaligned_vec *)(v + c0 + g * LANES);
        *(unaligned_vec *)(out + c0 + g * LANES) = lif_step(acc[g], &potential, tau, v_threshold);
        *(unaligned_vec *)(v + c0 + g * LANES) = potential;
    }
}

/* A layer of mlp_range over all its channels (a multiple of LANES), in tiles of up to
 * OUTPUT_VECS vectors. */
static void mlp_layer(const float *weight, const float *bias, int64_t width,
                      const int32_t *inputs, int64_t count, float *v, float *out, float tau,
                      float v_threshold) {
    int64_t c0 = 0;
    for (; c0 + OUTPUT_VECS * LANES <= width; c0 += OUTPUT_VECS * LANES)
        mlp_tile(weight, bias, width, inputs, count, c0, v, out, tau, v_threshold, OUTPUT_VECS);
    for (; c0 + VECS * LANES <= width; c0 += VECS * LANES)
        mlp_tile(weight, bias, width, inputs, count, c0, v, out, tau, v_threshold, VECS);
    for (; c0 < width; c0 += LANES)
        mlp_tile(weight, bias, width, inputs, count, c0, v, out, tau, v_threshold, 1);
}

/* Positions [begin, end) of the batch * h * w positions of a sample, all steps. */
static void mlp_range(void *arg, int64_t begin, int64_t end) {
    Mlp *m = arg;
    const Conv *c = &m->c;
    const int64_t batch = c->n / c->steps, positions = c->h * c->w, hidden = c->cout;
    float *buffer = malloc((2 * hidden + m->cout2) * sizeof(float));
    int32_t *listed = malloc(hidden * sizeof(int32_t));
    if (!buffer || !listed) m->out_of_memory = 1;
    float *v1 = buffer, *spikes = buffer + hidden, *v2 = buffer + 2 * hidden;
    for (int64_t unit = begin; unit < end && buffer && listed; unit++) {
        const int64_t b = unit / positions, position = unit % positions;
        memset(v1, 0, hidden * sizeof(float));
        memset(v2, 0, m->cout2 * sizeof(float));
        for (int64_t t = 0; t < c->steps; t++) {
            const int64_t image = t * batch + b, p = image * positions + position;
            mlp_layer(c->weight, c->bias, hidden, c->channels + c->offsets[p],
                      c->offsets[p + 1] - c->offsets[p], v1, spikes, c->tau, c->v_threshold);
            int64_t count = 0;
            for (int64_t k = 0; k < hidden; k += 64) {
                uint64_t other = 0;
                const int64_t width = hidden - k < 64 ? hidden - k : 64;
                for (uint64_t bits = spike_bits(spikes + k, width, &other); bits; bits &= bits - 1)
                    listed[count++] = (int32_t)(k + __builtin_ctzll(bits));
            }
            float *out = c->out + image * c->os.image + position * c->os.position;
            mlp_layer(m->weight2, m->bias2, m->cout2, listed, count, v2, out, c->tau,
                      m->v_threshold2);
        }
    }
    free(buffer);
    free(listed);
}

/*
 * out = the spikes of lif2(conv2(lif1(conv1(x)))) for pointwise conv1 (weight [cin][hidden],
 * bias) and conv2 (weight2 [hidden][cout2], bias2), LIFs with tau and v_threshold /
 * v_threshold2 over the images t * n / steps + b of each b; x (spikes or spike counts) and out
 * channels-last; hidden and cout2 multiples of 16. Bit for bit the spike-driven convolutions'
 * sums and the LIF kernels' spikes, in that order. Returns as statten_spike_conv2d does.
 */
int statten_spike_mlp(const float *x, const int64_t *x_strides, int64_t n, int64_t h, int64_t w,
                      int64_t cin, const float *weight, const float *bias, int64_t hidden,
                      const float *weight2, const float *bias2, int64_t cout2, float *out,
                      const int64_t *out_strides, double max_density, int64_t steps,
                      float v_threshold, float v_threshold2, float tau, int threads) {
    if (hidden % LANES || cout2 % LANES || steps < 1 || n % steps || out_strides[1] != 1)
        return 3;
    Mlp m = {{x, weight, bias, out, 0,
              {x_strides[0], x_strides[1], x_strides[2]},
              {out_strides[0], out_strides[1], out_strides[2]},
              n, h, w, cin, hidden, 1, 1, 0, h, w, 0, 0},
             weight2, bias2, cout2, v_threshold2, 0};
    m.c.steps = steps;
    m.c.v_threshold = v_threshold;
    m.c.tau = tau;
    const int status = list_spikes(&m.c, max_density, threads);
    if (status) return status;
    const double spikes_per_position = (double)m.c.offsets[n * h * w] / (double)(n * h * w);
    const int64_t unit_work =
        steps * (hidden + cout2) / LANES * (int64_t)(2.0 + spikes_per_position);
    parallel_for(mlp_range, &m, n / steps * h * w, 1, unit_work, threads);
    free(m.c.channels);
    free(m.c.offsets);
    return m.out_of_memory ? -1 : 0;
}

/* Weight gradient, output channels [c0, c0 + V * LANES): for each output position, its output
 * gradient (gathered per COLUMNS columns unless channels-last) is added, at each tap, into the
 * weight rows of the channels that spiked at the tapped input position (the tile's rows of every
 * tap, kh * kw * cin * V * 64 bytes, stay in L2). */
static inline __attribute__((always_inline)) void weight_grad_tile(const Conv *c, int64_t c0,
                                                                   const int V) {
    float buffer[COLUMNS * OUTPUT_VECS * LANES];
    for (int64_t image = 0; image < c->n; image++) {
        const float *grad = c->grad_out + image * c->os.image + c0 * c->os.channel;
        for (int64_t oy = 0; oy < c->oh; oy++) {
            for (int64_t ox0 = 0; ox0 < c->ow; ox0 += COLUMNS) {
                const int64_t m = c->ow - ox0 < COLUMNS ? c->ow - ox0 : COLUMNS;
                const float *rows = grad + (oy * c->ow + ox0) * c->os.position;
                int64_t row_stride = c->os.position;
                if (c->os.channel != 1) { /* gather the columns' gradients, channels inner */
                    for (int64_t k = 0; k < V * LANES; k++)
                        for (int64_t j = 0; j < m; j++)
                            buffer[j * V * LANES + k] = rows[k * c->os.channel + j];
                    rows = buffer;
                    row_stride = V * LANES;
                }
                for (int64_t ky = 0; ky < c->kh; ky++) {
                    const int64_t iy = oy + ky - c->pad;
                    if (iy < 0 || iy >= c->h) continue;
                    for (int64_t kx = 0; kx < c->kw; kx++) {
                        float *tap = c->out + (ky * c->kw + kx) * c->cin * c->cout + c0;
                        for (int64_t j = 0; j < m; j++) {
                            const int64_t ix = ox0 + j + kx - c->pad;
                            if (ix < 0 || ix >= c->w) continue;
                            const int64_t p = (image * c->h + iy) * c->w + ix;
                            if (c->offsets[p] == c->offsets[p + 1]) continue;
                            vec g[VECS];
                            for (int v = 0; v < V; v++)
                                g[v] = *(const unaligned_vec *)(rows + j * row_stride + v * LANES);
                            for (int64_t q = c->offsets[p]; q < c->offsets[p + 1]; q++) {
                                float *row = tap + (int64_t)c->channels[q] * c->cout;
                                for (int v = 0; v < V; v++)
                                    *(unaligned_vec *)(row + v * LANES) += g[v];
                            }
                        }
                    }
                }
            }
        }
    }
}

/* Tiles [begin, end) of VECS * LANES output channels (the last may be narrower); each thread
 * owns its tiles' columns of the weight gradient. */
static void weight_grad_range(void *arg, int64_t begin, int64_t end) {
    const Conv *c = arg;
    for (int64_t tile = begin; tile < end; tile++) {
        int64_t c0 = tile * VECS * LANES;
        if (c0 + VECS * LANES <= c->cout) {
            weight_grad_tile(c, c0, VECS);
            continue;
        }
        for (; c0 < c->cout; c0 += LANES) weight_grad_tile(c, c0, 1);
    }
}

/*
 * grad_weight [kh][kw][cin][cout] = the weight gradient of conv2d(x, .) given grad_out (x and
 * grad_out contiguous or channels-last, strides as for statten_spike_conv2d); grad_weight must
 * hold zeros. Returns as statten_spike_conv2d does.
 */
int statten_spike_conv2d_weight_grad(const float *x, const int64_t *x_strides, int64_t n,
                                     int64_t h, int64_t w, int64_t cin, const float *grad_out,
                                     const int64_t *grad_strides, int64_t cout, int64_t kh,
                                     int64_t kw, int64_t pad, float *grad_weight,
                                     double max_density, int threads) {
    if (cout % LANES) return 3;
    Conv c = {x, 0, 0, grad_weight, grad_out,
              {x_strides[0], x_strides[1], x_strides[2]},
              {grad_strides[0], grad_strides[1], grad_strides[2]},
              n, h, w, cin, cout, kh, kw, pad, h + 2 * pad - kh + 1, w + 2 * pad - kw + 1, 0, 0};
    const int status = list_spikes(&c, max_density, threads);
    if (status) return status;
    const int64_t tiles = (cout + VECS * LANES - 1) / (VECS * LANES);
    parallel_for(weight_grad_range, &c, tiles, 1, n * c.oh * c.ow * kh * kw * VECS, threads);
    free(c.channels);
    free(c.offsets);
    return 0;
}

/* Small non-negative integers (spikes, spike counts) as bytes, for the integer convolutions of
 * statten/fast/integer_conv.py: chunks of BYTES_GRAIN elements, each noting the bitwise or of its
 * values (at most 1 for spikes) or marking (-1) a value that is not an integer in [0, 255]. The
 * test reads the float's bits (integer operations only, so that the loop vectorizes). */
#define BYTES_GRAIN 65536

typedef struct {
    const float *x;
    uint8_t *out;
    int64_t *bits_or; /* per chunk */
    int failed;       /* set by the first chunk with another value: the rest are skipped */
} Bytes;

static void bytes_range(void *arg, int64_t begin, int64_t end) {
    Bytes *b = arg;
    const float *restrict x = b->x;
    uint8_t *restrict out = b->out;
    for (int64_t start = begin; start < end; start += BYTES_GRAIN) {
        if (__atomic_load_n(&b->failed, __ATOMIC_RELAXED)) return;
        const int64_t stop = start + BYTES_GRAIN < end ? start + BYTES_GRAIN : end;
        uint32_t bits_or = 0, other = 0;
        for (int64_t i = start; i < stop; i++) {
            uint32_t bits;
            memcpy(&bits, x + i, sizeof bits);
            const uint32_t exponent = bits >> 23;               /* >= 256 when negative */
            const uint32_t in_range = exponent - 127u <= 7u;     /* a value in [1, 256) */
            const uint32_t shift = in_range ? 150u - exponent : 0u;
            const uint32_t mantissa = (bits & 0x7FFFFFu) | 0x800000u;
            const uint32_t byte = in_range ? mantissa >> shift : 0u;
            /* in range: a fraction below the point; else anything but +-0 */
            other += in_range ? (mantissa & ((1u << shift) - 1u)) != 0u
                              : (bits & 0x7FFFFFFFu) != 0u;
            bits_or |= byte;
            out[i] = (uint8_t)byte;
        }
        b->bits_or[start / BYTES_GRAIN] = other ? -1 : (int64_t)bits_or;
        if (other) __atomic_store_n(&b->failed, 1, __ATOMIC_RELAXED);
    }
}

/*
 * out[i] = x[i] for the n elements of x when each is an integer in [0, 255] (out of any layout:
 * the caller passes the memory of a tensor and of its byte copy of the same strides). Returns
 * the bitwise or of the values (at most 1 when x is spikes), -1 when x holds another value (out
 * then holds garbage), -2 when out of memory.
 */
int64_t statten_small_integer_bytes(const float *x, uint8_t *out, int64_t n, int threads) {
    const int64_t chunks = (n + BYTES_GRAIN - 1) / BYTES_GRAIN;
    Bytes b = {x, out, malloc((chunks > 0 ? chunks : 1) * sizeof(int64_t)), 0};
    if (!b.bits_or) return -2;
    parallel_for(bytes_range, &b, n, BYTES_GRAIN, 1, threads);
    int64_t bits_or = b.failed ? -1 : 0;
    for (int64_t k = 0; k < chunks && bits_or >= 0; k++)
        bits_or = b.bits_or[k] < 0 ? -1 : bits_or | b.bits_or[k];
    free(b.bits_or);
    return bits_or;
}
