/*
 * spike_bits: which of up to 64 contiguous floats are nonzero, as the bits of a word, and whether
 * any of them is neither 0 nor 1 (spike inputs are 0/1; -0 counts as 0, NaN as another value).
 * AVX-512 compares 16 at a time where the compiler targets it. Shared by the spike-driven
 * kernels, which then visit the spikes by their bits: work in proportion to the spikes.
 */
#ifndef STATTEN_SPIKE_BITS_H
#define STATTEN_SPIKE_BITS_H

#include <stdint.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* Bit i: row[i] != 0, for i < count <= 64; *other gets nonzero bits if a value is not 0 or 1. */
static inline uint64_t spike_bits(const float *row, int64_t count, uint64_t *other) {
    uint64_t bits = 0, bad = 0;
    int64_t i = 0;
#ifdef __AVX512F__
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
    for (; i + 16 <= count; i += 16) {
        const __m512 v = _mm512_loadu_ps(row + i);
        const uint64_t nonzero = _mm512_cmp_ps_mask(v, zero, _CMP_NEQ_UQ);
        const uint64_t ones = _mm512_cmp_ps_mask(v, one, _CMP_EQ_OQ);
        bits |= nonzero << i;
        bad |= nonzero & ~ones;
    }
#endif
    for (; i < count; i++) {
        const uint64_t nonzero = row[i] != 0.0f;
        bits |= nonzero << i;
        bad |= nonzero & (row[i] != 1.0f);
    }
    *other |= bad;
    return bits;
}

#endif
