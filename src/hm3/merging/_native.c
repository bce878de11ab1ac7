/* hm3's compiled merge loops (issue 6): the task-arithmetic family's per-element arithmetic in one
 * pass over the inputs, and TIES' bracket scan, bit for bit what hm3.merging.kernels computes with
 * numpy's block-wise calls (tests/test_native.py checks every option against them).
 *
 * Loaded with ctypes by hm3.merging.native (no Python API here: a plain shared library, built by
 * setup.py as an optional extension; without a C compiler hm3 runs the numpy kernels instead).
 *
 * Why the results are the same bits: every element goes through the same float32 operations in the
 * same order as kernels' numpy calls (masks as 1.0f / 0.0f multiplied in, sums in model order, the
 * same comparisons), built with -ffp-contract=off (no fused multiply-add) and without -ffast-math.
 * The per-element loops work on small blocks held in cache (BLK elements per model).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__)) && defined(__linux__)
#define HM3_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define HM3_CLONES
#endif

#define HM3_MAX_MODELS 32
#define BLK 1024

/* One model's share of a merge (mirrors hm3.merging.native._Model). */
typedef struct {
    const float *src;      /* the model's tensor (x = src - base) or its task vector (x = src) */
    const uint8_t *bits;   /* mode 2: DARE's keep bits, packed little-endian, one per element */
    int64_t tie_from;      /* mode 1: elements with |x| == thr at this position or later are dropped */
    float thr;             /* mode 1: TIES keeps |x| >= thr */
    float inverse;         /* > 0: x / inverse after the mask (DARE's inverse rescale) */
    float factor;          /* then x * factor (a norm rescale; 1: none) */
    float weight;          /* then x * weight */
    int32_t mode;          /* 0: nothing dropped, 1: magnitude (TIES), 2: bits (DARE) */
    int32_t unused;
} hm3_model;

/* One tensor's merge (mirrors hm3.merging.native._Args). */
typedef struct {
    int64_t n;
    const float *base;
    float *out;
    const hm3_model *models;
    int32_t nm;
    int32_t src_is_delta;
    int32_t linear;        /* model soup: Σ x_i·w_i, then / total + base (normalize) or + total·base */
    int32_t consensus;     /* 0: plain sum, 1: sign election by sum, 2: by count of signs */
    int32_t normalize;
    int32_t has_lambda;
    float total;           /* Σ w_i in float32 (plain sum's divisor; linear's) */
    float lambda;
} hm3_args;

/* np.sign: 1, -1, 0 (the sign of a zero does not matter: only the sum's >= 0 is read), NaN for NaN */
static inline float sgn(float v) { return v != v ? v : (float)(v > 0.0f) - (float)(v < 0.0f); }

HM3_CLONES
static void task_vector(const hm3_args *a, const hm3_model *m, int64_t s, int64_t len, float *x)
{
    const float *src = m->src + s, *b = a->base + s;
    if (a->src_is_delta)
        memcpy(x, src, (size_t)len * sizeof(float));
    else
        for (int64_t j = 0; j < len; j++) x[j] = src[j] - b[j];
    if (m->mode == 1) {
        /* |x| >= t, except the ties at t from tie_from on: there |x| > t */
        const float t = m->thr;
        int64_t tie = m->tie_from - s;
        tie = tie < 0 ? 0 : (tie > len ? len : tie);
        for (int64_t j = 0; j < tie; j++) x[j] = (float)(fabsf(x[j]) >= t) * x[j];
        for (int64_t j = tie; j < len; j++) x[j] = (float)(fabsf(x[j]) > t) * x[j];
    } else if (m->mode == 2) {
        /* s is a multiple of BLK, so of 8: the block's bits start at a byte */
        const uint8_t *bits = m->bits + (s >> 3);
        const int64_t whole = len & ~(int64_t)7;
        for (int64_t k = 0; k < whole; k += 8) {
            const unsigned byte = bits[k >> 3];
            for (int j = 0; j < 8; j++) x[k + j] = (float)((byte >> j) & 1u) * x[k + j];
        }
        for (int64_t j = whole; j < len; j++) x[j] = (float)((bits[j >> 3] >> (j & 7)) & 1u) * x[j];
    }
    if (m->inverse > 0.0f) {
        const float d = m->inverse;
        for (int64_t j = 0; j < len; j++) x[j] = x[j] / d;
    }
}

HM3_CLONES
static void combine_block(const hm3_args *a, int64_t s, int64_t len, float (*x)[BLK], float *acc, float *aux)
{
    const int nm = a->nm;
    const float *b = a->base + s;
    float *out = a->out + s;
    if (a->linear) {
        const float w0 = a->models[0].weight;
        for (int64_t j = 0; j < len; j++) acc[j] = x[0][j] * w0;
        for (int i = 1; i < nm; i++) {
            const float w = a->models[i].weight;
            for (int64_t j = 0; j < len; j++) acc[j] = acc[j] + x[i][j] * w;
        }
        if (a->normalize) {
            const float total = a->total;
            for (int64_t j = 0; j < len; j++) out[j] = acc[j] / total + b[j];
        } else {
            const float total = a->total;
            for (int64_t j = 0; j < len; j++) out[j] = acc[j] + total * b[j];
        }
        return;
    }
    for (int i = 0; i < nm; i++) { /* the factor (a rescale), then the weight: before the election */
        const float f = a->models[i].factor, w = a->models[i].weight;
        for (int64_t j = 0; j < len; j++) x[i][j] = (x[i][j] * f) * w;
    }
    if (a->consensus) {
        /* aux: what the election reads, then 1.0 where + is elected */
        if (a->consensus == 1) {
            for (int64_t j = 0; j < len; j++) aux[j] = x[0][j];
            for (int i = 1; i < nm; i++)
                for (int64_t j = 0; j < len; j++) aux[j] = aux[j] + x[i][j];
        } else {
            for (int64_t j = 0; j < len; j++) aux[j] = sgn(x[0][j]);
            for (int i = 1; i < nm; i++)
                for (int64_t j = 0; j < len; j++) aux[j] = aux[j] + sgn(x[i][j]);
        }
        for (int64_t j = 0; j < len; j++) aux[j] = (float)(aux[j] >= 0.0f);
        for (int i = 0; i < nm; i++) {
            float *xi = x[i];
            for (int64_t j = 0; j < len; j++) {
                const float agree = (float)((float)(xi[j] > 0.0f) == aux[j]);
                xi[j] = xi[j] * agree;
            }
        }
        for (int64_t j = 0; j < len; j++) acc[j] = x[0][j];
        for (int i = 1; i < nm; i++)
            for (int64_t j = 0; j < len; j++) acc[j] = acc[j] + x[i][j];
        if (a->normalize) { /* Σ w_i over the models that agree; 1 where none does */
            const float w0 = a->models[0].weight;
            for (int64_t j = 0; j < len; j++) aux[j] = (float)(x[0][j] != 0.0f) * w0;
            for (int i = 1; i < nm; i++) {
                const float w = a->models[i].weight;
                for (int64_t j = 0; j < len; j++) aux[j] = aux[j] + (float)(x[i][j] != 0.0f) * w;
            }
            for (int64_t j = 0; j < len; j++) {
                const float d = aux[j] + (float)(aux[j] == 0.0f);
                acc[j] = acc[j] / d;
            }
        }
    } else {
        for (int64_t j = 0; j < len; j++) acc[j] = x[0][j];
        for (int i = 1; i < nm; i++)
            for (int64_t j = 0; j < len; j++) acc[j] = acc[j] + x[i][j];
        if (a->normalize) {
            const float total = a->total;
            for (int64_t j = 0; j < len; j++) acc[j] = acc[j] / total;
        }
    }
    if (a->has_lambda) {
        const float l = a->lambda;
        for (int64_t j = 0; j < len; j++) acc[j] = acc[j] * l;
    }
    for (int64_t j = 0; j < len; j++) out[j] = acc[j] + b[j];
}

/* The merge of elements [start, stop) of one tensor into a->out. 0, or -1 for too many models. */
int hm3_merge(const hm3_args *a, int64_t start, int64_t stop)
{
    float x[HM3_MAX_MODELS][BLK];
    float acc[BLK], aux[BLK];
    if (a->nm < 1 || a->nm > HM3_MAX_MODELS) return -1;
    for (int64_t s = start; s < stop; s += BLK) {
        const int64_t len = stop - s < BLK ? stop - s : BLK;
        for (int i = 0; i < a->nm; i++) task_vector(a, &a->models[i], s, len, x[i]);
        combine_block(a, s, len, x, acc, aux);
    }
    return 0;
}

/* TIES' bracket scan (kernels._bracket's loop): over v = |src - base| (|src| when base is NULL),
 * how many v < lo (*below), the v with lo <= v <= hi in memory order (into inside, the first cap of
 * them), and how many of those each block of `block` elements holds (counts). NaN: neither.
 * Returns how many lie inside (more than cap: the caller retries with room for all). */
HM3_CLONES
static int64_t bracket_portable(int64_t n, const float *src, const float *base, float lo, float hi, int64_t block,
                                int64_t *below, int64_t *counts, float *inside, int64_t cap)
{
    enum { W = 16 }; /* small: few chunks hold a bracketed value (the bracket is ~1.6% of them) */
    float v[W];
    int64_t c = 0, under = 0;
    for (int64_t s = 0, bi = 0; s < n; s += block, bi++) {
        const int64_t e = s + block < n ? s + block : n, c0 = c;
        for (int64_t q = s; q < e; q += W) {
            const int64_t len = e - q < W ? e - q : W;
            int any = 0;
            int64_t u = 0;
            if (base)
                for (int64_t j = 0; j < len; j++) v[j] = fabsf(src[q + j] - base[q + j]);
            else
                for (int64_t j = 0; j < len; j++) v[j] = fabsf(src[q + j]);
            for (int64_t j = 0; j < len; j++) {
                u += v[j] < lo;
                any |= (v[j] >= lo) & (v[j] <= hi);
            }
            under += u;
            if (any) {
                if (c + len <= cap) /* room for all: store each, keep the ones inside (no branch) */
                    for (int64_t j = 0; j < len; j++) {
                        inside[c] = v[j];
                        c += (v[j] >= lo) & (v[j] <= hi);
                    }
                else
                    for (int64_t j = 0; j < len; j++)
                        if (v[j] >= lo && v[j] <= hi) {
                            if (c < cap) inside[c] = v[j];
                            c++;
                        }
            }
        }
        counts[bi] = c - c0;
    }
    *below = under;
    return c;
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define HM3_HAVE_AVX2_BRACKET 1
/* The same scan, 8 values a step: |x| by clearing the sign bit (as fabsf), ordered comparisons
 * (NaN: false, as in C), the count below by popcount, the rare bracketed values by their mask. */
__attribute__((target("avx2,popcnt")))
static int64_t bracket_avx2(int64_t n, const float *src, const float *base, float lo, float hi, int64_t block,
                            int64_t *below, int64_t *counts, float *inside, int64_t cap)
{
    const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    int64_t c = 0, under = 0;
    for (int64_t s = 0, bi = 0; s < n; s += block, bi++) {
        const int64_t e = s + block < n ? s + block : n, c0 = c;
        int64_t q = s;
        for (; q + 8 <= e; q += 8) {
            __m256 x = _mm256_loadu_ps(src + q);
            if (base) x = _mm256_sub_ps(x, _mm256_loadu_ps(base + q));
            const __m256 v = _mm256_and_ps(x, magnitude);
            const __m256 ge = _mm256_cmp_ps(v, vlo, _CMP_GE_OQ);
            under += __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, vlo, _CMP_LT_OQ)));
            unsigned in = (unsigned)_mm256_movemask_ps(_mm256_and_ps(ge, _mm256_cmp_ps(v, vhi, _CMP_LE_OQ)));
            if (in) {
                float t[8];
                _mm256_storeu_ps(t, v);
                while (in) {
                    const int j = __builtin_ctz(in);
                    in &= in - 1;
                    if (c < cap) inside[c] = t[j];
                    c++;
                }
            }
        }
        for (; q < e; q++) {
            const float v = base ? fabsf(src[q] - base[q]) : fabsf(src[q]);
            under += v < lo;
            if (v >= lo && v <= hi) {
                if (c < cap) inside[c] = v;
                c++;
            }
        }
        counts[bi] = c - c0;
    }
    *below = under;
    return c;
}
#endif

/* The portable scan on its own (tests compare both with numpy on machines that have AVX2). */
int64_t hm3_bracket_portable(int64_t n, const float *src, const float *base, float lo, float hi, int64_t block,
                             int64_t *below, int64_t *counts, float *inside, int64_t cap)
{
    return bracket_portable(n, src, base, lo, hi, block, below, counts, inside, cap);
}

int64_t hm3_bracket(int64_t n, const float *src, const float *base, float lo, float hi, int64_t block,
                    int64_t *below, int64_t *counts, float *inside, int64_t cap)
{
#ifdef HM3_HAVE_AVX2_BRACKET
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt"))
        return bracket_avx2(n, src, base, lo, hi, block, below, counts, inside, cap);
#endif
    return bracket_portable(n, src, base, lo, hi, block, below, counts, inside, cap);
}

void hm3_keep_bits(int64_t n, const int16_t *r16, int16_t below, uint8_t *bits);

/* numpy's float32 sum of a contiguous run (add.reduce: pairwise, 8 accumulators up to 128
 * elements, halves on multiples of 8 above), which kernels.row_sums gets for each row. */
static float pairwise_sum(const float *a, int64_t n)
{
    if (n < 8) {
        float r = 0.0f;
        for (int64_t i = 0; i < n; i++) r += a[i];
        return r;
    }
    if (n <= 128) {
        float r[8];
        int64_t i;
        for (int k = 0; k < 8; k++) r[k] = a[k];
        for (i = 8; i < n - (n % 8); i += 8)
            for (int k = 0; k < 8; k++) r[k] += a[i + k];
        float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) res += a[i];
        return res;
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

#define SUM_CHUNK 4096 /* kernels.SUM_CHUNK */

/* DARE's step 1 for one block of m elements (streamed._bits): the keep bits (r16 < below, packed
 * little-endian; the block starts at a byte) and, with rows_x, the l1 rescale's row sums — of |x|
 * into rows_x and of |keep * x| into rows_kx, a row per SUM_CHUNK elements (kernels.row_sums; the
 * block starts at a row). x = src - base, or src when base is NULL. */
HM3_CLONES
void hm3_dare_block(int64_t m, const float *src, const float *base, const int16_t *r16, int16_t below,
                    uint8_t *bits, float *rows_x, float *rows_kx)
{
    hm3_keep_bits(m, r16, below, bits);
    if (!rows_x) return;
    float ax[SUM_CHUNK], akx[SUM_CHUNK];
    for (int64_t s = 0, row = 0; s < m; s += SUM_CHUNK, row++) {
        const int64_t len = m - s < SUM_CHUNK ? m - s : SUM_CHUNK;
        for (int64_t j = 0; j < len; j++) {
            const float x = base ? src[s + j] - base[s + j] : src[s + j];
            ax[j] = fabsf(x);
            akx[j] = fabsf((float)(r16[s + j] < below) * x);
        }
        rows_x[row] = pairwise_sum(ax, len);
        rows_kx[row] = pairwise_sum(akx, len);
    }
}
/* DARE's keep bits (streamed._bits): bit e of the packed output is r16[e] < below, little-endian
 * within each byte; n elements, (n + 7) / 8 bytes (the last byte's spare bits 0). */
HM3_CLONES
void hm3_keep_bits(int64_t n, const int16_t *r16, int16_t below, uint8_t *bits)
{
    const int64_t whole = n / 8;
    for (int64_t k = 0; k < whole; k++) {
        const int16_t *r = r16 + 8 * k;
        uint8_t byte = 0;
        for (int j = 0; j < 8; j++) byte |= (uint8_t)((r[j] < below) << j);
        bits[k] = byte;
    }
    if (n % 8) {
        uint8_t byte = 0;
        for (int64_t j = 0; j < n % 8; j++) byte |= (uint8_t)((r16[8 * whole + j] < below) << j);
        bits[whole] = byte;
    }
}
