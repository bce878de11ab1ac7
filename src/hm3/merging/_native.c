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
 * A tensor goes block by block (BLK elements, held in cache): one pass per model that reads its
 * input once and does every per-model step (task vector, mask, scaling) and its share of the
 * election's sum; then, with an election, one pass over the kept x_i; then the last pass. Sums start
 * at -0.0f, which adds nothing, so each is kernels' sum from its first term on.
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

#define INLINE static inline __attribute__((always_inline))

/* What a model's pass adds its x_i into (a sum starts at -0.0f, which adds nothing: -0 + v is v for
 * every v, -0 and NaN included, so the sums equal kernels' sums that start from the first term). */
enum {
    ACC_ELECT_SUM = 0,  /* x_i kept for the election pass; aux += x_i (sign election by sum) */
    ACC_ELECT_SIGN = 1, /* x_i kept; aux += sgn(x_i) (by count) */
    ACC_PLAIN = 2,      /* acc += x_i (no election: x_i not kept) */
    ACC_LINEAR = 3,     /* acc += x_i * w_i, x_i neither masked nor scaled (model soup) */
};

/* One element of one model, after its mask: / inverse, then * factor, * weight (not for linear). */
INLINE float scaled(float v, float d, float f, float w, const int inv, const int kind)
{
    if (inv) v = v / d;
    if (kind != ACC_LINEAR) v = (v * f) * w;
    return v;
}

INLINE void take(float v, int64_t j, float *restrict x, float *restrict sum, float w, const int kind)
{
    if (kind == ACC_ELECT_SUM) {
        x[j] = v;
        sum[j] = sum[j] + v;
    } else if (kind == ACC_ELECT_SIGN) {
        x[j] = v;
        sum[j] = sum[j] + sgn(v);
    } else if (kind == ACC_PLAIN) {
        sum[j] = sum[j] + v;
    } else {
        sum[j] = sum[j] + v * w;
    }
}

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

INLINE v8f load8(const float *p)
{
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

INLINE void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }

/* take() of 8 lanes: the same operations per lane */
INLINE void take8(v8f v, int64_t j, float *restrict x, float *restrict sum, float w, const int kind)
{
    if (kind == ACC_ELECT_SUM) {
        store8(x + j, v);
        store8(sum + j, load8(sum + j) + v);
    } else if (kind == ACC_ELECT_SIGN) {
        const v8i one = (v8i){0} + 0x3f800000, nan = v != v;
        const v8f sign = (v8f)((v > 0) & one) - (v8f)((v < 0) & one);
        store8(x + j, v);
        store8(sum + j, load8(sum + j) + (v8f)(((v8i)v & nan) | ((v8i)sign & ~nan)));
    } else if (kind == ACC_PLAIN) {
        store8(sum + j, load8(sum + j) + v);
    } else {
        store8(sum + j, load8(sum + j) + v * w);
    }
}

/* One model's pass over a block, every per-element step of kernels in one loop: x = src - base (or
 * src), its mask (1: TIES' |x| >= t, > t from position tie on; 2: DARE's keep bits), the scaling,
 * and the sum it goes into. The flags are constants at each call (see load_block): one loop each. */
INLINE void load_spec(const float *restrict src, const float *restrict b, const uint8_t *restrict bits, int64_t len,
                      int64_t tie, float t, float d, float f, float w, float *restrict x, float *restrict sum,
                      const int diff, const int mode, const int inv, const int kind)
{
#define XJ(j) (diff ? src[j] - b[j] : src[j])
    if (mode == 2) {
        /* the block starts at a multiple of 8: bits[k >> 3] holds elements k..k+7; 8 lanes at a time
         * in GCC's vector types (the compiler does not vectorise the per-byte loop by itself) */
        const int64_t whole = len & ~(int64_t)7;
        const v8i lane_bit = {1, 2, 4, 8, 16, 32, 64, 128}, one = (v8i){0} + 0x3f800000; /* 1.0f */
        for (int64_t k = 0; k < whole; k += 8) {
            const v8i set = (((v8i){0} + bits[k >> 3]) & lane_bit) != 0; /* -1 where kept */
            const v8f keep = (v8f)(set & one);                            /* 1.0f or 0.0f */
            v8f v = load8(src + k);
            if (diff) v = v - load8(b + k);
            v = keep * v;
            if (inv) v = v / d;
            if (kind != ACC_LINEAR) v = (v * f) * w;
            take8(v, k, x, sum, w, kind);
        }
        for (int64_t j = whole; j < len; j++)
            take(scaled((float)((bits[j >> 3] >> (j & 7)) & 1u) * XJ(j), d, f, w, inv, kind), j, x, sum, w, kind);
    } else if (mode == 1) {
        for (int64_t j = 0; j < tie; j++) {
            const float v = XJ(j);
            take(scaled((float)(fabsf(v) >= t) * v, d, f, w, inv, kind), j, x, sum, w, kind);
        }
        for (int64_t j = tie; j < len; j++) {
            const float v = XJ(j);
            take(scaled((float)(fabsf(v) > t) * v, d, f, w, inv, kind), j, x, sum, w, kind);
        }
    } else {
        for (int64_t j = 0; j < len; j++) take(scaled(XJ(j), d, f, w, inv, kind), j, x, sum, w, kind);
    }
#undef XJ
}

HM3_CLONES
static void load_block(const hm3_args *a, const hm3_model *m, int64_t s, int64_t len, float *restrict x,
                       float *restrict sum, int kind)
{
    const int diff = !a->src_is_delta, mode = m->mode, inv = m->inverse > 0.0f;
    const float *src = m->src + s, *b = a->base + s;
    const uint8_t *bits = mode == 2 ? m->bits + (s >> 3) : NULL;
    int64_t tie = m->tie_from - s;
    tie = tie < 0 ? 0 : (tie > len ? len : tie);
    const float t = m->thr, d = m->inverse, f = m->factor, w = m->weight;
    switch (((diff * 3 + mode) * 2 + inv) * 4 + kind) {
#define CASE(D, M, I, K)                                                                         \
    case ((D * 3 + M) * 2 + I) * 4 + K:                                                          \
        load_spec(src, b, bits, len, tie, t, d, f, w, x, sum, D, M, I, K);                       \
        break;
#define KINDS(D, M, I) CASE(D, M, I, 0) CASE(D, M, I, 1) CASE(D, M, I, 2) CASE(D, M, I, 3)
#define INVS(D, M) KINDS(D, M, 0) KINDS(D, M, 1)
#define MODES(D) INVS(D, 0) INVS(D, 1) INVS(D, 2)
        MODES(0)
        MODES(1)
#undef MODES
#undef INVS
#undef KINDS
#undef CASE
    }
}

/* The election's pass over a block's kept x_i (aux holds the sums or sign counts): each x_i where
 * its sign is the elected one, summed into acc; with normalize, Σ w_i over those into cnt. */
HM3_CLONES
static void elect_block(const hm3_args *a, int64_t len, float (*x)[BLK], float *restrict aux, float *restrict acc,
                        float *restrict cnt)
{
    for (int64_t j = 0; j < len; j++) {
        aux[j] = (float)(aux[j] >= 0.0f);
        acc[j] = -0.0f;
        cnt[j] = -0.0f;
    }
    for (int i = 0; i < a->nm; i++) {
        const float *restrict xi = x[i];
        const float w = a->models[i].weight;
        if (a->normalize)
            for (int64_t j = 0; j < len; j++) {
                const float xm = xi[j] * (float)((float)(xi[j] > 0.0f) == aux[j]);
                acc[j] = acc[j] + xm;
                cnt[j] = cnt[j] + (float)(xm != 0.0f) * w;
            }
        else
            for (int64_t j = 0; j < len; j++) acc[j] = acc[j] + xi[j] * (float)((float)(xi[j] > 0.0f) == aux[j]);
    }
}

/* The last pass: the division (normalize), λ, the base. */
HM3_CLONES
static void finish_block(const hm3_args *a, int64_t s, int64_t len, const float *restrict acc,
                         const float *restrict cnt)
{
    const float *restrict b = a->base + s;
    float *restrict out = a->out + s;
    const float total = a->total, l = a->lambda;
    if (a->linear) {
        if (a->normalize)
            for (int64_t j = 0; j < len; j++) out[j] = acc[j] / total + b[j];
        else
            for (int64_t j = 0; j < len; j++) out[j] = acc[j] + total * b[j];
        return;
    }
    const int by_count = a->consensus && a->normalize, by_total = !a->consensus && a->normalize;
    if (by_count) { /* Σ w_i over the models that agree; 1 where none does */
        if (a->has_lambda)
            for (int64_t j = 0; j < len; j++) out[j] = (acc[j] / (cnt[j] + (float)(cnt[j] == 0.0f))) * l + b[j];
        else
            for (int64_t j = 0; j < len; j++) out[j] = acc[j] / (cnt[j] + (float)(cnt[j] == 0.0f)) + b[j];
    } else if (by_total) {
        if (a->has_lambda)
            for (int64_t j = 0; j < len; j++) out[j] = (acc[j] / total) * l + b[j];
        else
            for (int64_t j = 0; j < len; j++) out[j] = acc[j] / total + b[j];
    } else {
        if (a->has_lambda)
            for (int64_t j = 0; j < len; j++) out[j] = acc[j] * l + b[j];
        else
            for (int64_t j = 0; j < len; j++) out[j] = acc[j] + b[j];
    }
}

/* The merge of elements [start, stop) of one tensor into a->out, block by block: one pass per model
 * (its x_i into the election's sums, or straight into the total), the election's pass, the last.
 * 0, or -1 for too many models. */
int hm3_merge(const hm3_args *a, int64_t start, int64_t stop)
{
    float x[HM3_MAX_MODELS][BLK];
    float acc[BLK], aux[BLK], cnt[BLK];
    if (a->nm < 1 || a->nm > HM3_MAX_MODELS) return -1;
    const int kind = a->linear ? ACC_LINEAR : a->consensus == 1 ? ACC_ELECT_SUM : a->consensus == 2 ? ACC_ELECT_SIGN
                                                                                                    : ACC_PLAIN;
    const int elect = kind == ACC_ELECT_SUM || kind == ACC_ELECT_SIGN;
    float *sum = elect ? aux : acc; /* what the models' passes add into */
    for (int64_t s = start; s < stop; s += BLK) {
        const int64_t len = stop - s < BLK ? stop - s : BLK;
        for (int64_t j = 0; j < len; j++) sum[j] = -0.0f;
        for (int i = 0; i < a->nm; i++) load_block(a, &a->models[i], s, len, x[i], sum, kind);
        if (elect) elect_block(a, len, x, aux, acc, cnt);
        finish_block(a, s, len, acc, cnt);
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
#define HM3_HAVE_AVX2 1
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
#ifdef HM3_HAVE_AVX2
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
static void keep_bits_portable(int64_t n, const int16_t *r16, int16_t below, uint8_t *bits)
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

#ifdef HM3_HAVE_AVX2
/* The same, 32 elements a step: two compares of 16 int16, packed to bytes (the packing interleaves
 * the 128-bit lanes; the permute puts them back in order), their top bits as 32 bits. */
__attribute__((target("avx2")))
static void keep_bits_avx2(int64_t n, const int16_t *r16, int16_t below, uint8_t *bits)
{
    const __m256i lim = _mm256_set1_epi16(below);
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
        const __m256i lo = _mm256_cmpgt_epi16(lim, _mm256_loadu_si256((const __m256i *)(r16 + k)));
        const __m256i hi = _mm256_cmpgt_epi16(lim, _mm256_loadu_si256((const __m256i *)(r16 + k + 16)));
        const uint32_t m = (uint32_t)_mm256_movemask_epi8(_mm256_permute4x64_epi64(_mm256_packs_epi16(lo, hi), 0xD8));
        memcpy(bits + k / 8, &m, sizeof m); /* x86 is little-endian: elements k..k+7 in the first byte */
    }
    if (k < n) keep_bits_portable(n - k, r16 + k, below, bits + k / 8);
}
#endif

void hm3_keep_bits(int64_t n, const int16_t *r16, int16_t below, uint8_t *bits)
{
#ifdef HM3_HAVE_AVX2
    if (__builtin_cpu_supports("avx2")) {
        keep_bits_avx2(n, r16, below, bits);
        return;
    }
#endif
    keep_bits_portable(n, r16, below, bits);
}

/* The portable loop on its own (tests compare both with numpy on machines that have AVX2). */
void hm3_keep_bits_portable(int64_t n, const int16_t *r16, int16_t below, uint8_t *bits)
{
    keep_bits_portable(n, r16, below, bits);
}

/* n draws of numpy's SFC64 (Chris Doty-Humphrey's small fast counting generator, 64-bit), from and
 * back into state = {a, b, c, counter}: the values and the final state of numpy's random_raw(n). */
void hm3_sfc64_fill(uint64_t *state, uint64_t *out, int64_t n)
{
    uint64_t a = state[0], b = state[1], c = state[2], w = state[3];
    for (int64_t i = 0; i < n; i++) {
        const uint64_t tmp = a + b + w++;
        a = b ^ (b >> 11);
        b = c + (c << 3);
        c = ((c << 24) | (c >> 40)) + tmp;
        out[i] = tmp;
    }
    state[0] = a;
    state[1] = b;
    state[2] = c;
    state[3] = w;
}
