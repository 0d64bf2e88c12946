/*
 * Max pooling over contiguous planes and its gradient, for CPU (float32), loaded by
 * statten/fast/native.py via ctypes.
 *
 * The same results as torch's CPU kernels, bit for bit: each window is scanned in row-major
 * order and a value replaces the running maximum when it is larger or NaN, starting from -inf
 * with the first position of the window; the gradient adds each output gradient into its
 * argmax, plane by plane in output order (what scatter_add does), onto zeros. Indices are int32
 * positions within the plane (what the memory-efficient layers store). Planes are independent,
 * so they are split over threads.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "parallel.h"

typedef struct {
    const float *x;
    float *out;
    int32_t *indices;
    const float *grad_out;
    float *grad_x;
    int64_t h, w, oh, ow, kh, kw, sh, sw, ph, pw;
} PoolJob;

/* Windows of at most MAX_KERNEL rows, output rows of at most MAX_WIDTH (the caller checks): the
 * per-row maxima of one output row fit on the stack. */
#define MAX_KERNEL 8
#define MAX_WIDTH 1024

/* Take v over (best, at) when torch's scan would: v larger, or v NaN. */
#define TAKE(v, best) (((v) > (best)) | ((v) != (v)))

/* One column of every window of a row: column ox * stride + offset of window ox, for the
 * windows [lo, hi) in which it lies inside the row. Inlined with a constant stride, it
 * vectorises over the windows. */
static inline void window_column(const float *restrict row, int64_t offset, int64_t stride,
                                 int64_t lo, int64_t hi, float *restrict best,
                                 int32_t *restrict at) {
    for (int64_t ox = lo; ox < hi; ox++) {
        const int64_t x = ox * stride + offset;
        const float v = row[x];
        const int take = TAKE(v, best[ox]);
        best[ox] = take ? v : best[ox];
        at[ox] = take ? (int32_t)x : at[ox];
    }
}

/* Maximum and first argmax column of each window of input row `row` (columns clipped to the
 * row), scanning the window's columns in order. */
static void row_maxima(const PoolJob *r, const float *row, float *best, int32_t *at) {
    for (int64_t ox = 0; ox < r->ow; ox++) {
        const int64_t x = ox * r->sw - r->pw;
        best[ox] = -INFINITY;
        at[ox] = (int32_t)(x < 0 ? 0 : x);
    }
    for (int64_t k = 0; k < r->kw; k++) {
        const int64_t offset = k - r->pw; /* window ox reads column ox * sw + offset */
        int64_t lo = offset < 0 ? (-offset + r->sw - 1) / r->sw : 0;
        int64_t hi = offset < r->w ? (r->w - 1 - offset) / r->sw + 1 : 0;
        if (hi > r->ow) hi = r->ow;
        if (r->sw == 2)
            window_column(row, offset, 2, lo, hi, best, at);
        else if (r->sw == 1)
            window_column(row, offset, 1, lo, hi, best, at);
        else
            window_column(row, offset, r->sw, lo, hi, best, at);
    }
}

/* Per output row: the maxima of its window rows, then the maximum down them. In row-major order
 * the first maximum of a window is the first maximum of the first row that holds it, and the
 * last NaN is the last NaN of the last row that holds one: the same as torch's single scan. */
static void pool_range(void *arg, int64_t begin, int64_t end) {
    const PoolJob *r = arg;
    float best[MAX_KERNEL][MAX_WIDTH];
    int32_t at[MAX_KERNEL][MAX_WIDTH];
    for (int64_t p = begin; p < end; p++) {
        const float *plane = r->x + p * r->h * r->w;
        for (int64_t oy = 0; oy < r->oh; oy++) {
            const int64_t y_start = oy * r->sh - r->ph;
            const int64_t y1 = y_start + r->kh < r->h ? y_start + r->kh : r->h;
            const int64_t y0 = y_start < 0 ? 0 : y_start;
            for (int64_t y = y0; y < y1; y++)
                row_maxima(r, plane + y * r->w, best[y - y0], at[y - y0]);
            float *out = r->out + (p * r->oh + oy) * r->ow;
            int32_t *indices = r->indices + (p * r->oh + oy) * r->ow;
            for (int64_t ox = 0; ox < r->ow; ox++) {
                const int64_t x = ox * r->sw - r->pw;
                out[ox] = -INFINITY;
                indices[ox] = (int32_t)(y0 * r->w + (x < 0 ? 0 : x));
            }
            for (int64_t y = y0; y < y1; y++)
                for (int64_t ox = 0; ox < r->ow; ox++) {
                    const float v = best[y - y0][ox];
                    const int take = TAKE(v, out[ox]);
                    out[ox] = take ? v : out[ox];
                    indices[ox] = take ? (int32_t)(y * r->w) + at[y - y0][ox] : indices[ox];
                }
        }
    }
}

static void unpool_range(void *arg, int64_t begin, int64_t end) {
    const PoolJob *r = arg;
    const int64_t outputs = r->oh * r->ow;
    for (int64_t p = begin; p < end; p++) {
        float *grad_x = r->grad_x + p * r->h * r->w;
        const float *grad_out = r->grad_out + p * outputs;
        const int32_t *indices = r->indices + p * outputs;
        memset(grad_x, 0, (size_t)(r->h * r->w) * sizeof(float));
        for (int64_t j = 0; j < outputs; j++) grad_x[indices[j]] += grad_out[j];
    }
}

/* The usual pooling of spiking transformers, 3x3 windows, stride 2, padding 1, on planes of even
 * height and width, in long loops: window ox of a row reads columns 2ox - 1 (none for ox = 0),
 * 2ox and 2ox + 1, so over a batch of planes laid end to end the row maxima are three passes
 * over flat indices j (= row * ow + ox), reading x[2j - 1], x[2j] and x[2j + 1]. The first
 * pass also reads x[2j - 1] for ox = 0, the previous row's last column, and those entries are
 * reset before the second. The maxima down the rows then run row by row, as in pool_range. */
#define POOL_BATCH 8192 /* row maxima per batch of planes (two stack arrays of this size) */

static void pool_3x3_stride_2_range(void *arg, int64_t begin, int64_t end) {
    const PoolJob *r = arg;
    const int64_t per_plane = r->h * r->ow, batch = POOL_BATCH / per_plane;
    float best[POOL_BATCH];
    int32_t at[POOL_BATCH];
    for (int64_t p0 = begin; p0 < end; p0 += batch) {
        const int64_t planes = end - p0 < batch ? end - p0 : batch, count = planes * per_plane;
        const float *x = r->x + p0 * r->h * r->w;
        best[0] = -INFINITY;
        at[0] = 0;
        for (int64_t j = 1; j < count; j++) {
            const float v = x[2 * j - 1];
            const int take = TAKE(v, -INFINITY);
            best[j] = take ? v : -INFINITY;
            at[j] = (int32_t)(2 * j - 1);
        }
        for (int64_t j = 0; j < count; j += r->ow) { /* ox = 0: no column to its left */
            best[j] = -INFINITY;
            at[j] = (int32_t)(2 * j);
        }
        for (int64_t k = 0; k < 2; k++)
            for (int64_t j = 0; j < count; j++) {
                const float v = x[2 * j + k];
                const int take = TAKE(v, best[j]);
                best[j] = take ? v : best[j];
                at[j] = take ? (int32_t)(2 * j + k) : at[j];
            }
        for (int64_t q = 0; q < planes; q++) {
            const int32_t plane = (int32_t)(q * r->h * r->w); /* at[] counts from x */
            const int64_t rows = q * per_plane;
            for (int64_t oy = 0; oy < r->oh; oy++) {
                float *out = r->out + ((p0 + q) * r->oh + oy) * r->ow;
                int32_t *indices = r->indices + ((p0 + q) * r->oh + oy) * r->ow;
                const int64_t y0 = oy == 0 ? 0 : 2 * oy - 1, y1 = 2 * oy + 2;
                for (int64_t ox = 0; ox < r->ow; ox++) {
                    out[ox] = -INFINITY;
                    indices[ox] = (int32_t)(y0 * r->w + (ox == 0 ? 0 : 2 * ox - 1));
                }
                for (int64_t y = y0; y < y1; y++) {
                    const float *row_best = best + rows + y * r->ow;
                    const int32_t *row_at = at + rows + y * r->ow;
                    for (int64_t ox = 0; ox < r->ow; ox++) {
                        const float v = row_best[ox];
                        const int take = TAKE(v, out[ox]);
                        out[ox] = take ? v : out[ox];
                        indices[ox] = take ? row_at[ox] - plane : indices[ox];
                    }
                }
            }
        }
    }
}

int statten_max_pool2d(const float *x, int64_t planes, int64_t h, int64_t w, float *out,
                       int32_t *indices, int64_t oh, int64_t ow, int64_t kh, int64_t kw,
                       int64_t sh, int64_t sw, int64_t ph, int64_t pw, int threads) {
    PoolJob job = {x, out, indices, 0, 0, h, w, oh, ow, kh, kw, sh, sw, ph, pw};
    const int usual = kh == 3 && kw == 3 && sh == 2 && sw == 2 && ph == 1 && pw == 1 &&
                      h % 2 == 0 && w % 2 == 0 && h * ow <= POOL_BATCH;
    return parallel_for(usual ? pool_3x3_stride_2_range : pool_range, &job, planes, 1,
                        oh * ow * kh * kw, threads);
}

int statten_max_unpool2d(const float *grad_out, const int32_t *indices, int64_t planes,
                         int64_t h, int64_t w, int64_t oh, int64_t ow, float *grad_x,
                         int threads) {
    PoolJob job = {0, 0, (int32_t *)indices, grad_out, grad_x, h, w, oh, ow, 0, 0, 0, 0, 0, 0};
    return parallel_for(unpool_range, &job, planes, 1, h * w, threads);
}

/* Channels-last max pooling, values only (inference): each output position takes, channel by
 * channel, the maximum over its window of input positions scanned in row-major order, with
 * torch's rule (a larger value or a NaN replaces the maximum), so the results equal torch's to
 * the bit (signed zeros included: the first of equal values stays). Channels are innermost, so
 * the loop over them vectorises; output rows are split over threads. */
typedef struct {
    const float *x;
    float *out;
    int64_t h, w, c, oh, ow, kh, kw, sh, sw, ph, pw;
} ChannelsLastPool;

static void channels_last_range(void *arg, int64_t begin, int64_t end) {
    const ChannelsLastPool *r = arg;
    for (int64_t row = begin; row < end; row++) { /* image * oh + oy */
        const int64_t image = row / r->oh, y0 = row % r->oh * r->sh - r->ph;
        for (int64_t ox = 0; ox < r->ow; ox++) {
            float *restrict best = r->out + (row * r->ow + ox) * r->c;
            for (int64_t k = 0; k < r->c; k++) best[k] = -INFINITY;
            const int64_t x0 = ox * r->sw - r->pw;
            for (int64_t y = y0 < 0 ? 0 : y0; y < y0 + r->kh && y < r->h; y++) {
                for (int64_t x = x0 < 0 ? 0 : x0; x < x0 + r->kw && x < r->w; x++) {
                    const float *restrict v = r->x + ((image * r->h + y) * r->w + x) * r->c;
                    for (int64_t k = 0; k < r->c; k++)
                        best[k] = TAKE(v[k], best[k]) ? v[k] : best[k];
                }
            }
        }
    }
}

/* out [n][oh][ow][c] = max pooling of x [n][h][w][c] (dilation 1, floor mode, padding at most
 * half the window, as torch requires). */
int statten_max_pool2d_channels_last(const float *x, int64_t n, int64_t h, int64_t w, int64_t c,
                                     float *out, int64_t oh, int64_t ow, int64_t kh, int64_t kw,
                                     int64_t sh, int64_t sw, int64_t ph, int64_t pw, int threads) {
    ChannelsLastPool job = {x, out, h, w, c, oh, ow, kh, kw, sh, sw, ph, pw};
    return parallel_for(channels_last_range, &job, n * oh, 1, ow * c * kh * kw, threads);
}
