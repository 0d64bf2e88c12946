/*
 * Fused multi-step LIF kernels for CPU (float32), loaded by statten/fast/native.py via ctypes.
 *
 * Tensors are rows [T][n]: time step t of element i at t * n + i. Each thread takes a range of
 * elements and walks it in blocks of BLOCK elements whose state stays in L1 while the block's T
 * steps run, so every input is read once and every output written once.
 *
 * The arithmetic is that of statten/fast/kernels.py (_spikes_eager, _input_grad_eager), itself
 * SpikingJelly's, operation for operation in IEEE single precision: compile without
 * -ffast-math and with -ffp-contract=off, so results are bit-identical. The sigmoid of the
 * surrogate gradient is left to torch (between lif_charge and lif_grad), whose vectorised exp
 * this file cannot reproduce bit for bit.
 *
 * lif_spikes and lif_charge can take their input as BatchNorm's training output of a convolution's output: the
 * element's channel is (i / inner) % channels and its value scale[c] * x + shift[c], both
 * rounded once (fmaf), as torch's CPU batch norm kernel computes it when built with FMA
 * contraction; statten/fast/kernels.py checks that against torch before using it.
 */
#include <math.h>
#include <stdint.h>

#include "parallel.h"

int64_t statten_thread_work = 1 << 18;

/* Set the least work per thread of every kernel (see parallel.h); 1 splits every call. */
void statten_set_thread_work(int64_t work) { statten_thread_work = work > 0 ? work : 1; }

#define BLOCK 256

/* Inner loops read element i of a row before writing element i of a row that may be the same
 * one (in-place): safe to vectorise, which the compiler cannot prove by itself. */
#if defined(__clang__)
#define VECTORIZE _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define VECTORIZE _Pragma("GCC ivdep")
#else
#define VECTORIZE
#endif

typedef struct {
    const float *x;      /* input (spikes, charge) or sigmoid of the surrogate (grad) */
    const float *grad;   /* gradient w.r.t. the spikes (grad) */
    float *out;          /* spikes (spikes), surrogate argument (charge), input gradient (grad) */
    uint8_t *below;      /* 1 where the charged potential stayed below the threshold */
    int64_t steps, n;
    float v_threshold, tau, alpha;
    const float *scale, *shift; /* per-channel affine map of x (spikes, charge), or none */
    int64_t channels, inner;
} Job;

/* The scale and shift of elements [start, start + m) of a row, by their channel. */
static void affine_terms(const Job *r, int64_t start, int64_t m, float *scale, float *shift) {
    int64_t channel = start / r->inner % r->channels, within = start % r->inner;
    for (int64_t i = 0; i < m; i++) {
        scale[i] = r->scale[channel];
        shift[i] = r->shift[channel];
        if (++within == r->inner) {
            within = 0;
            if (++channel == r->channels) channel = 0;
        }
    }
}

/* Row x of m elements as the LIF sees it: x itself, or its affine map written into `mapped`. */
static const float *mapped_input(const Job *r, const float *x, int64_t m, const float *scale,
                                 const float *shift, float *mapped) {
    if (!r->scale) return x;
    for (int64_t i = 0; i < m; i++) mapped[i] = fmaf(x[i], scale[i], shift[i]);
    return mapped;
}

/* Spikes of the LIF fed x: H = V + (X - V) / tau, spike when H >= v_th, hard reset to 0. */
static void spikes_range(void *arg, int64_t begin, int64_t end) {
    const Job *r = arg;
    const float v_threshold = r->v_threshold, tau = r->tau;
    float v[BLOCK], scale[BLOCK], shift[BLOCK], mapped[BLOCK];
    for (int64_t start = begin; start < end; start += BLOCK) {
        const int64_t m = end - start < BLOCK ? end - start : BLOCK;
        for (int64_t i = 0; i < m; i++) v[i] = 0.0f;
        if (r->scale) affine_terms(r, start, m, scale, shift);
        for (int64_t t = 0; t < r->steps; t++) {
            const float *x = mapped_input(r, r->x + t * r->n + start, m, scale, shift, mapped);
            float *s = r->out + t * r->n + start;
            VECTORIZE
            for (int64_t i = 0; i < m; i++) {
                const float h = v[i] + (x[i] - v[i]) / tau;
                const int fire = h >= v_threshold;
                s[i] = fire ? 1.0f : 0.0f;
                v[i] = fire ? 0.0f : h;
            }
        }
    }
}

/* Recharges the potentials from x; out = (H - v_th) * alpha, below = H < v_th (out may be x). */
static void charge_range(void *arg, int64_t begin, int64_t end) {
    const Job *r = arg;
    const float v_threshold = r->v_threshold, tau = r->tau, alpha = r->alpha; /* not aliased */
    float v[BLOCK], scale[BLOCK], shift[BLOCK], mapped[BLOCK];
    for (int64_t start = begin; start < end; start += BLOCK) {
        const int64_t m = end - start < BLOCK ? end - start : BLOCK;
        for (int64_t i = 0; i < m; i++) v[i] = 0.0f;
        if (r->scale) affine_terms(r, start, m, scale, shift);
        for (int64_t t = 0; t < r->steps; t++) {
            const float *x = mapped_input(r, r->x + t * r->n + start, m, scale, shift, mapped);
            float *z = r->out + t * r->n + start;
            uint8_t *below = r->below + t * r->n + start;
            VECTORIZE
            for (int64_t i = 0; i < m; i++) {
                const float h = (x[i] - v[i]) / tau + v[i];
                z[i] = (h - v_threshold) * alpha;
                below[i] = h < v_threshold;
                v[i] = h >= v_threshold ? 0.0f : h;
            }
        }
    }
}

/* Backward through time from sig = sigmoid((H - v_th) * alpha); out may be sig. */
static void grad_range(void *arg, int64_t begin, int64_t end) {
    const Job *r = arg;
    const float tau = r->tau, alpha = r->alpha;
    float grad_v[BLOCK];
    for (int64_t start = begin; start < end; start += BLOCK) {
        const int64_t m = end - start < BLOCK ? end - start : BLOCK;
        for (int64_t t = r->steps - 1; t >= 0; t--) {
            const int64_t at = t * r->n + start;
            const float *sig = r->x + at, *grad_s = r->grad + at;
            const uint8_t *below = r->below + at;
            float *grad_x = r->out + at;
            const int last = t == r->steps - 1;
            VECTORIZE
            for (int64_t i = 0; i < m; i++) {
                float grad_h = (1.0f - sig[i]) * sig[i] * alpha * grad_s[i];
                if (!last) grad_h = grad_h + grad_v[i] * (below[i] ? 1.0f : 0.0f);
                const float g = grad_h / tau;
                grad_x[i] = g;
                grad_v[i] = grad_h - g;
            }
        }
    }
}

int statten_lif_spikes(const float *x, float *spikes, int64_t steps, int64_t n,
                       float v_threshold, float tau, const float *scale, const float *shift,
                       int64_t channels, int64_t inner, int threads) {
    Job job = {x, 0, spikes, 0, steps, n, v_threshold, tau, 0.0f, scale, shift, channels, inner};
    return parallel_for(spikes_range, &job, n, BLOCK, steps, threads);
}

int statten_lif_charge(const float *x, float *out, uint8_t *below, int64_t steps, int64_t n,
                       float v_threshold, float tau, float alpha, const float *scale,
                       const float *shift, int64_t channels, int64_t inner, int threads) {
    Job job = {x, 0, out, below, steps, n, v_threshold, tau, alpha, scale, shift, channels, inner};
    return parallel_for(charge_range, &job, n, BLOCK, 2 * steps, threads);
}

int statten_lif_grad(const float *sig, const float *grad_spikes, const uint8_t *below,
                     float *grad_x, int64_t steps, int64_t n, float tau, float alpha,
                     int threads) {
    Job job = {sig, grad_spikes, grad_x, (uint8_t *)below, steps, n, 0.0f, tau, alpha, 0, 0, 1, 1};
    return parallel_for(grad_range, &job, n, BLOCK, 2 * steps, threads);
}

/* BatchNorm's linear terms, as torch's CPU kernel computes them: scale = invstd * weight,
 * shift = bias - mean * scale rounded once. */
void statten_batch_norm_terms(const float *mean, const float *invstd, const float *weight,
                              const float *bias, float *scale, float *shift, int64_t channels) {
    for (int64_t c = 0; c < channels; c++) {
        scale[c] = invstd[c] * weight[c];
        shift[c] = fmaf(-mean[c], scale[c], bias[c]);
    }
}

/* Batch statistics of a contiguous x [N][C][S] exactly as torch's CPU kernel collects them for
 * BatchNorm: per channel a double sum over n then s, in that order; mean = sum / (N S) rounded to
 * float; var_sum = the double sum of the float squares (x - mean)^2, rounded to float. GROUP
 * channels run side by side, each its own chain in torch's order, so the additions overlap. */
#define GROUP 8

typedef struct {
    const float *x;
    float *mean, *var_sum;
    int64_t images, channels, size;
} StatsJob;

static void stats_range(void *arg, int64_t begin, int64_t end) {
    const StatsJob *r = arg;
    const int64_t count = r->images * r->size;
    for (int64_t c0 = begin; c0 < end; c0 += GROUP) {
        const int64_t g = end - c0 < GROUP ? end - c0 : GROUP;
        double sum[GROUP] = {0}, var_sum[GROUP] = {0};
        float mean[GROUP];
        for (int64_t n = 0; n < r->images; n++) {
            const float *x = r->x + (n * r->channels + c0) * r->size;
            for (int64_t s = 0; s < r->size; s++)
                for (int64_t k = 0; k < g; k++) sum[k] += x[k * r->size + s];
        }
        for (int64_t k = 0; k < g; k++) mean[k] = (float)(sum[k] / count);
        for (int64_t n = 0; n < r->images; n++) {
            const float *x = r->x + (n * r->channels + c0) * r->size;
            for (int64_t s = 0; s < r->size; s++)
                for (int64_t k = 0; k < g; k++) {
                    const float d = x[k * r->size + s] - mean[k];
                    var_sum[k] += d * d;
                }
        }
        for (int64_t k = 0; k < g; k++) {
            r->mean[c0 + k] = mean[k];
            r->var_sum[c0 + k] = (float)var_sum[k];
        }
    }
}

int statten_batch_norm_stats(const float *x, int64_t images, int64_t channels, int64_t size,
                             float *mean, float *var_sum, int threads) {
    StatsJob job = {x, mean, var_sum, images, channels, size};
    return parallel_for(stats_range, &job, channels, GROUP, 2 * images * size, threads);
}
