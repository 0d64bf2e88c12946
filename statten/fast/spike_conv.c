/*
 * Spike-driven convolution on CPU (float32), loaded by statten/fast/native.py: the forward pass
 * and the weight gradient, the two products of a convolution that multiply by its input.
 *
 * A spiking layer's input is 0 or 1 and mostly 0. Instead of multiplying every input by every
 * weight (a dense convolution), each output adds up the weights of the inputs that spiked: for
 * each output position and tile of output channels, over the kernel taps, over the list of input
 * channels that spiked at the tapped position. The weight gradient adds, for each spike and tap,
 * the output gradient at the tapped output position into the weight row of the spike's channel.
 * The work is proportional to the number of spikes; the results equal the dense ones up to the
 * order of the additions.
 *
 * Layouts: input [n][h][w][cin] (channels-last), weights [kh][kw][cin][cout], bias [cout] or
 * null, output and output gradient [n][oh][ow][cout] (channels-last); stride 1, zero padding
 * `pad` on every side; cout a multiple of 16.
 */
#include <stdint.h>
#include <stdlib.h>

#include "parallel.h"

/* Output channels are accumulated 16 at a time in vector registers (GCC/clang vector types: one
 * AVX-512 register, or two AVX2 / four SSE ones), up to VECS vectors per pass (4 beat 8 and 2
 * on the CIFAR-10 2-512 layers, on Zen 4 and Sapphire Rapids alike: benchmarks/spike_conv.py). */
typedef float vec __attribute__((vector_size(64)));
typedef float unaligned_vec __attribute__((vector_size(64), aligned(4)));
#define LANES 16
#define VECS 4

typedef struct {
    const float *x, *weight, *bias;
    float *out; /* the output, or the weight gradient */
    const float *grad_out;
    int64_t n, h, w, cin, cout, kh, kw, pad, oh, ow;
    int64_t *offsets; /* spikes of position p: channels[offsets[p] .. offsets[p + 1]) */
    int32_t *channels;
} Conv;

/* Spikes per input position, or -1 for a position holding a value other than 0 and 1. */
static void count_range(void *arg, int64_t begin, int64_t end) {
    const Conv *c = arg;
    for (int64_t p = begin; p < end; p++) {
        const float *v = c->x + p * c->cin;
        int64_t spikes = 0, other = 0;
        for (int64_t i = 0; i < c->cin; i++) {
            spikes += v[i] == 1.0f;
            other += v[i] != 1.0f && v[i] != 0.0f;
        }
        c->offsets[p + 1] = other ? -1 : spikes;
    }
}

static void list_range(void *arg, int64_t begin, int64_t end) {
    const Conv *c = arg;
    for (int64_t p = begin; p < end; p++) {
        const float *v = c->x + p * c->cin;
        int32_t *channel = c->channels + c->offsets[p];
        for (int64_t i = 0; i < c->cin; i++)
            if (v[i] != 0.0f) *channel++ = (int32_t)i;
    }
}

/* The outputs at one position, channels [c0, c0 + V * LANES): bias plus, over the kernel taps,
 * the weights of the channels that spiked at the tapped input position. */
static inline __attribute__((always_inline)) void output_tile(const Conv *c, int64_t image,
                                                              int64_t oy, int64_t ox, int64_t c0,
                                                              float *out, const int V) {
    vec acc[VECS];
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
    for (int v = 0; v < V; v++) *(unaligned_vec *)(out + c0 + v * LANES) = acc[v];
}

/* Output channels [c0, c0 + V * LANES) of output rows [begin, end) of the n * oh rows. */
static inline __attribute__((always_inline)) void channel_tile(const Conv *c, int64_t begin,
                                                               int64_t end, int64_t c0,
                                                               const int V) {
    for (int64_t row = begin; row < end; row++) {
        const int64_t image = row / c->oh, oy = row % c->oh;
        for (int64_t ox = 0; ox < c->ow; ox++)
            output_tile(c, image, oy, ox, c0, c->out + (row * c->ow + ox) * c->cout, V);
    }
}

/* Output rows [begin, end) (cout is a multiple of LANES), one tile of output channels at a time
 * so that the tile's weights stay in cache while the rows sweep over them. */
static void conv_range(void *arg, int64_t begin, int64_t end) {
    const Conv *c = arg;
    int64_t c0 = 0;
    for (; c0 + VECS * LANES <= c->cout; c0 += VECS * LANES) channel_tile(c, begin, end, c0, VECS);
    for (; c0 < c->cout; c0 += LANES) channel_tile(c, begin, end, c0, 1);
}

/* The spike lists of c->x (c->offsets, c->channels; the caller frees both when this returns 0);
 * otherwise the status of statten_spike_conv2d, nothing allocated. */
static int list_spikes(Conv *c, double max_density, int threads) {
    const int64_t positions = c->n * c->h * c->w;
    c->offsets = malloc((positions + 1) * sizeof(int64_t));
    if (!c->offsets) return -1;
    parallel_for(count_range, c, positions, 256, threads);
    c->offsets[0] = 0;
    for (int64_t p = 0; p < positions; p++) {
        if (c->offsets[p + 1] < 0) {
            free(c->offsets);
            return 1;
        }
        c->offsets[p + 1] += c->offsets[p];
    }
    const int64_t spikes = c->offsets[positions];
    if ((double)spikes > max_density * (double)(positions * c->cin)) {
        free(c->offsets);
        return 2;
    }
    c->channels = malloc((spikes > 0 ? spikes : 1) * sizeof(int32_t));
    if (!c->channels) {
        free(c->offsets);
        return -1;
    }
    parallel_for(list_range, c, positions, 256, threads);
    return 0;
}

/*
 * out = conv2d(x, weight) + bias. Returns 0 when done, 1 (out untouched) when x holds a value
 * other than 0 and 1, 2 when more than max_density of x is 1 (the dense convolution is then
 * faster), 3 when cout is not a multiple of 16, -1 when out of memory.
 */
int statten_spike_conv2d(const float *x, int64_t n, int64_t h, int64_t w, int64_t cin,
                         const float *weight, const float *bias, int64_t cout, int64_t kh,
                         int64_t kw, int64_t pad, float *out, double max_density, int threads) {
    if (cout % LANES) return 3;
    Conv c = {x, weight, bias, out, 0, n, h, w, cin, cout, kh, kw, pad,
              h + 2 * pad - kh + 1, w + 2 * pad - kw + 1, 0, 0};
    const int status = list_spikes(&c, max_density, threads);
    if (status) return status;
    parallel_for(conv_range, &c, n * c.oh, 1, threads);
    free(c.channels);
    free(c.offsets);
    return 0;
}

/* Weight gradient, output channels [c0, c0 + V * LANES): for each input position, its output
 * gradient row at each tap is loaded once and added into the weight rows of the channels that
 * spiked there (one tap's rows of the tile, cin * V * 64 bytes, stay in L2). */
static inline __attribute__((always_inline)) void weight_grad_tile(const Conv *c, int64_t c0,
                                                                   const int V) {
    for (int64_t ky = 0; ky < c->kh; ky++) {
        for (int64_t kx = 0; kx < c->kw; kx++) {
            float *tap = c->out + (ky * c->kw + kx) * c->cin * c->cout + c0;
            for (int64_t image = 0; image < c->n; image++) {
                for (int64_t oy = 0; oy < c->oh; oy++) {
                    const int64_t iy = oy + ky - c->pad;
                    if (iy < 0 || iy >= c->h) continue;
                    for (int64_t ox = 0; ox < c->ow; ox++) {
                        const int64_t ix = ox + kx - c->pad;
                        if (ix < 0 || ix >= c->w) continue;
                        const int64_t p = (image * c->h + iy) * c->w + ix;
                        if (c->offsets[p] == c->offsets[p + 1]) continue;
                        const float *g =
                            c->grad_out + ((image * c->oh + oy) * c->ow + ox) * c->cout + c0;
                        vec grad[VECS];
                        for (int v = 0; v < V; v++)
                            grad[v] = *(const unaligned_vec *)(g + v * LANES);
                        for (int64_t q = c->offsets[p]; q < c->offsets[p + 1]; q++) {
                            float *row = tap + (int64_t)c->channels[q] * c->cout;
                            for (int v = 0; v < V; v++)
                                *(unaligned_vec *)(row + v * LANES) += grad[v];
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
 * grad_weight = the weight gradient of conv2d(x, .) given grad_out; grad_weight must hold
 * zeros. Returns as statten_spike_conv2d does.
 */
int statten_spike_conv2d_weight_grad(const float *x, int64_t n, int64_t h, int64_t w,
                                     int64_t cin, const float *grad_out, int64_t cout, int64_t kh,
                                     int64_t kw, int64_t pad, float *grad_weight,
                                     double max_density, int threads) {
    if (cout % LANES) return 3;
    Conv c = {x, 0, 0, grad_weight, grad_out, n, h, w, cin, cout, kh, kw, pad,
              h + 2 * pad - kh + 1, w + 2 * pad - kw + 1, 0, 0};
    const int status = list_spikes(&c, max_density, threads);
    if (status) return status;
    const int64_t tiles = (cout + VECS * LANES - 1) / (VECS * LANES);
    parallel_for(weight_grad_range, &c, tiles, 1, threads);
    free(c.channels);
    free(c.offsets);
    return 0;
}
