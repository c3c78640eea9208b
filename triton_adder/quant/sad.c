/* int8 AdderNet reduction on the CPU: sums of absolute differences (DESIGN.md section 7).
 *
 * Compiled at first use by triton_adder/quant/native.py, once per ISA variant:
 *   cc -O3 -fopenmp -shared -fPIC [-mavx512f -mavx512bw [-mavx512ifma] | -mavx2] sad.c
 * The variant follows from the compiler's own macros (__AVX512BW__, __AVX2__), so the flags alone
 * choose it. Every operand byte is a quantized value plus 128 (uint8), so |a - b| of the stored
 * bytes is |x_q - w_q| and the unsigned SAD instruction applies. VPSADBW sums 8 byte differences
 * into each 64-bit lane; the kernel makes each lane a different output channel:
 *   input:  8 bytes of one position's row, broadcast to every lane;
 *   weight: 8 channels x the same 8 bytes of K, one 64-byte group (AVX-512BW: one zmm; AVX2: two ymm);
 * so a lane accumulates one (position, channel) sum over K, 64 byte differences per zmm VPSADBW,
 * and no horizontal reduction is needed at the end. The portable variant is the same loop in C. With
 * AVX512-IFMA (Ice Lake and later Intel cores, Zen 4) the AVX-512BW variant accumulates with VPMADD52LUQ
 * (acc + sad * 1) instead of VPADDQ, to keep the accumulation off VPSADBW's port.
 *
 * Layout (made by the caller), K in im2col order (tap row i, tap column j, channel in group):
 *   A = [groups][m_pad][kpad]: one row per output position (rows >= m are filler);
 *   W = [groups][tg_pad / 8][kpad / 8][8 channels][8 bytes]: 8-channel groups, K in 8-byte steps.
 * kpad is a multiple of 8 and tg_pad of 8; filler bytes are 128 in both operands, so they add 0.
 *
 * Blocking (all run-time arguments, so a tuner can search them):
 *   mr x nr   register block: mr positions x nr output channels (nr a multiple of 8, at most 32);
 *   mc x nc   cache block: one task of the OpenMP loop, an int32 tile of mc x nc sums;
 *   kc        K chunk (bytes, multiple of 8): the weight strip of a chunk (nr x kc bytes) stays in
 *             L1 while the mr-row strips of the mc-row block stream past it.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#define TA_ISA 2
#elif defined(__AVX2__)
#include <immintrin.h>
#define TA_ISA 1
#else
#define TA_ISA 0
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#endif

#define TA_PAD_BYTE 128

/* Which variant this library is: 0 portable, 1 AVX2, 2 AVX-512BW (the loader checks it). */
int ta_isa(void) { return TA_ISA; }

/* ------------------------------------------------------------------------------------------- */
/* Micro-kernels: c[j*ldc + i] (+)= sum_k |a[i*lda + k] - W(j, k)|, i < MR, j < 8*NV, k < kc,      */
/* W(j, k) = w[(j/8)*gstride + (k/8)*64 + (j%8)*8 + k%8] (8-channel groups, gstride = kpad*8).    */
/* The tile c is channel-major (ldc = its row count), so the epilogue reads positions in order.  */
/* ------------------------------------------------------------------------------------------- */

typedef void (*micro_fn)(const uint8_t *, int64_t, const uint8_t *, int64_t, int64_t, int32_t *, int64_t, int);

static inline int64_t load8(const uint8_t *p) {
    int64_t v;
    memcpy(&v, p, 8);
    return v;
}

#if TA_ISA > 0
/* c[0..3] = v (first K chunk) or += v (later chunks) */
static inline void add4(int32_t *c, __m128i v, int accumulate) {
    if (accumulate) v = _mm_add_epi32(_mm_loadu_si128((const __m128i *)c), v);
    _mm_storeu_si128((__m128i *)c, v);
}
/* rows v0..v3 (4 int32 channels each) -> c[ch*ldc + i] (+)= v_i[ch]: a 4 x 4 transpose. */
static inline void add_4x4_t(__m128i v0, __m128i v1, __m128i v2, __m128i v3, int32_t *c, int64_t ldc,
                             int accumulate) {
    __m128i t0 = _mm_unpacklo_epi32(v0, v1), t1 = _mm_unpackhi_epi32(v0, v1);
    __m128i t2 = _mm_unpacklo_epi32(v2, v3), t3 = _mm_unpackhi_epi32(v2, v3);
    add4(c, _mm_unpacklo_epi64(t0, t2), accumulate);
    add4(c + ldc, _mm_unpackhi_epi64(t0, t2), accumulate);
    add4(c + 2 * ldc, _mm_unpacklo_epi64(t1, t3), accumulate);
    add4(c + 3 * ldc, _mm_unpackhi_epi64(t1, t3), accumulate);
}
#endif

#if TA_ISA == 2
typedef __m512i vec_t;
#define VPG 1   /* vectors per 8-channel group */
#define LANES 8 /* channels per vector */
#define VZERO() _mm512_setzero_si512()
#define VLOAD(p) _mm512_loadu_si512((const void *)(p))
#define VBCAST(p) _mm512_set1_epi64(load8(p))
#if defined(__AVX512IFMA__)
/* acc + sad * 1 in one VPMADD52LUQ (a full 64-bit add of the 52-bit product; sums stay below 2**31): the
 * accumulation leaves the port VPSADBW needs (p5 on Intel), where VPADDQ competes for it. One core of a
 * 4 GHz Xeon, benchmarks/sad_peak.py: 0.85 VPSADBW + VPMADD52LUQ pairs per cycle vs 0.73 with VPADDQ. */
#define VSADACC(acc, a, b) _mm512_madd52lo_epu64((acc), _mm512_sad_epu8((a), (b)), _mm512_set1_epi64(1))
#else
#define VSADACC(acc, a, b) _mm512_add_epi64((acc), _mm512_sad_epu8((a), (b)))
#endif
/* rows 0..3 of one vector column (8 channels each, lanes < 2**31) -> channel-major c */
static inline void store_rows4(const vec_t *r0, const vec_t *r1, const vec_t *r2, const vec_t *r3, int32_t *c,
                               int64_t ldc, int accumulate) {
    __m256i v0 = _mm512_cvtepi64_epi32(*r0), v1 = _mm512_cvtepi64_epi32(*r1);
    __m256i v2 = _mm512_cvtepi64_epi32(*r2), v3 = _mm512_cvtepi64_epi32(*r3);
    add_4x4_t(_mm256_castsi256_si128(v0), _mm256_castsi256_si128(v1), _mm256_castsi256_si128(v2),
              _mm256_castsi256_si128(v3), c, ldc, accumulate);
    add_4x4_t(_mm256_extracti128_si256(v0, 1), _mm256_extracti128_si256(v1, 1), _mm256_extracti128_si256(v2, 1),
              _mm256_extracti128_si256(v3, 1), c + 4 * ldc, ldc, accumulate);
}
static inline void to_lanes(vec_t v, int64_t *out) { _mm512_storeu_si512((void *)out, v); }
#elif TA_ISA == 1
typedef __m256i vec_t;
#define VPG 2
#define LANES 4
#define VZERO() _mm256_setzero_si256()
#define VLOAD(p) _mm256_loadu_si256((const __m256i *)(p))
#define VBCAST(p) _mm256_set1_epi64x(load8(p))
#define VSADACC(acc, a, b) _mm256_add_epi64((acc), _mm256_sad_epu8((a), (b)))
static inline __m128i low32(__m256i v) {
    return _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6)));
}
static inline void store_rows4(const vec_t *r0, const vec_t *r1, const vec_t *r2, const vec_t *r3, int32_t *c,
                               int64_t ldc, int accumulate) {
    add_4x4_t(low32(*r0), low32(*r1), low32(*r2), low32(*r3), c, ldc, accumulate);
}
static inline void to_lanes(vec_t v, int64_t *out) { _mm256_storeu_si256((__m256i *)out, v); }
#endif

#if TA_ISA > 0
#define DEFINE_MICRO(MR, NV)                                                                            \
    static void micro_##MR##x##NV(const uint8_t *restrict a, int64_t lda, const uint8_t *restrict w,    \
                                  int64_t gstride, int64_t kc, int32_t *restrict c, int64_t ldc, int accumulate) {      \
        vec_t acc[MR][NV * VPG];                                                                        \
        for (int i = 0; i < MR; i++)                                                                    \
            for (int j = 0; j < NV * VPG; j++) acc[i][j] = VZERO();                                     \
        for (int64_t k = 0; k < kc; k += 8) {                                                           \
            vec_t wv[NV * VPG];                                                                         \
            for (int v = 0; v < NV; v++)                                                                \
                for (int h = 0; h < VPG; h++) wv[v * VPG + h] = VLOAD(w + v * gstride + k * 8 + h * 64 / VPG); \
            for (int i = 0; i < MR; i++) {                                                              \
                vec_t av = VBCAST(a + i * lda + k);                                                     \
                for (int j = 0; j < NV * VPG; j++) acc[i][j] = VSADACC(acc[i][j], av, wv[j]);           \
            }                                                                                           \
        }                                                                                               \
        if (MR % 4 == 0) {                                                                              \
            for (int i = 0; i + 3 < MR; i += 4)                                                         \
                for (int j = 0; j < NV * VPG; j++)                                                      \
                    store_rows4(&acc[i][j], &acc[i + 1 < MR ? i + 1 : 0][j], &acc[i + 2 < MR ? i + 2 : 0][j], \
                                &acc[i + 3 < MR ? i + 3 : 0][j], c + j * LANES * ldc + i, ldc, accumulate);         \
        } else {                                                                                        \
            int64_t lanes[LANES];                                                                       \
            for (int i = 0; i < MR; i++)                                                                \
                for (int j = 0; j < NV * VPG; j++) {                                                    \
                    to_lanes(acc[i][j], lanes);                                                         \
                    for (int l = 0; l < LANES; l++) {                                                   \
                        int32_t *dst = c + (j * LANES + l) * ldc + i;                                   \
                        *dst = (accumulate ? *dst : 0) + (int32_t)lanes[l];                             \
                    }                                                                                   \
                }                                                                                       \
        }                                                                                               \
    }
#else
/* The same loop in plain C: 8 sums of 8 byte differences per 64-byte weight group. */
#define DEFINE_MICRO(MR, NV)                                                                            \
    static void micro_##MR##x##NV(const uint8_t *restrict a, int64_t lda, const uint8_t *restrict w,    \
                                  int64_t gstride, int64_t kc, int32_t *restrict c, int64_t ldc, int accumulate) {      \
        int32_t acc[MR][NV * 8];                                                                        \
        memset(acc, 0, sizeof(acc));                                                                    \
        for (int64_t k = 0; k < kc; k += 8)                                                             \
            for (int i = 0; i < MR; i++) {                                                              \
                const uint8_t *ai = a + i * lda + k;                                                    \
                for (int v = 0; v < NV; v++) {                                                          \
                    const uint8_t *wg = w + v * gstride + k * 8;                                        \
                    for (int j = 0; j < 8; j++) {                                                       \
                        int32_t s = 0;                                                                  \
                        for (int b = 0; b < 8; b++) s += abs((int)ai[b] - (int)wg[j * 8 + b]);          \
                        acc[i][v * 8 + j] += s;                                                         \
                    }                                                                                   \
                }                                                                                       \
            }                                                                                           \
        for (int i = 0; i < MR; i++)                                                                    \
            for (int j = 0; j < NV * 8; j++) c[j * ldc + i] = (accumulate ? c[j * ldc + i] : 0) + acc[i][j];                               \
    }
#endif

/* The register blocks compiled: mr in {1,2,3,4,6,8} x nr = 8*NV channels, NV in {1,2,3,4}
 * (native.MICRO_MR / MICRO_NR). */
#define DEFINE_ROW(MR) DEFINE_MICRO(MR, 1) DEFINE_MICRO(MR, 2) DEFINE_MICRO(MR, 3) DEFINE_MICRO(MR, 4)
DEFINE_ROW(1)
DEFINE_ROW(2)
DEFINE_ROW(3)
DEFINE_ROW(4)
DEFINE_ROW(6)
DEFINE_ROW(8)

static micro_fn pick_micro(int mr, int nv) {
#define CASE(MR, NV) \
    if (mr == MR && nv == NV) return micro_##MR##x##NV;
#define CASE_ROW(MR) CASE(MR, 1) CASE(MR, 2) CASE(MR, 3) CASE(MR, 4)
    CASE_ROW(1) CASE_ROW(2) CASE_ROW(3) CASE_ROW(4) CASE_ROW(6) CASE_ROW(8)
#undef CASE_ROW
#undef CASE
    return NULL;
}

/* ------------------------------------------------------------------------------------------- */
/* Input quantization: x (N, C, H, W, any strides) -> uint8 NHWC, round(x * inv_scale) clamped   */
/* to [-127, 127], plus 128.                                                                     */
/* ------------------------------------------------------------------------------------------- */

/* One value: v = x * inv_scale in double; NaN -> +127 (as +inf: the SIMD min returns its second
 * operand when either is NaN, and the ternaries below are written to match). */
static inline uint8_t quantize_one(double v) {
    v = v < 127.0 ? v : 127.0;
    v = v > -127.0 ? v : -127.0;
#if FLT_EVAL_METHOD == 0
    /* Round half to even (as torch.round) in the default rounding mode: |v| <= 127 << 2**51. */
    v = (v + 6755399441055744.0) - 6755399441055744.0;
#else
    v = nearbyint(v);
#endif
    return (uint8_t)((int32_t)v + 128);
}

/* Runs of 16 values: o[k] = quantize_one(x[k] * inv_scale), k < 16, with explicit SIMD where there is
 * some (GCC's own vectorisation of quantize_one spills mask registers and runs 2-4x slower). */
#if TA_ISA == 2
static inline __m128i quantize8x2_pd(__m512d lo, __m512d hi, __m512d inv) {
    const __m512d top = _mm512_set1_pd(127.0), bottom = _mm512_set1_pd(-127.0);
    lo = _mm512_max_pd(_mm512_min_pd(_mm512_mul_pd(lo, inv), top), bottom);
    hi = _mm512_max_pd(_mm512_min_pd(_mm512_mul_pd(hi, inv), top), bottom);
    __m256i ilo = _mm512_cvt_roundpd_epi32(lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256i ihi = _mm512_cvt_roundpd_epi32(hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512i i32 = _mm512_inserti64x4(_mm512_castsi256_si512(ilo), ihi, 1);
    return _mm512_cvtepi32_epi8(_mm512_add_epi32(i32, _mm512_set1_epi32(128)));
}
static inline void quantize16_f32(const float *x, double inv_scale, uint8_t *o) {
    const __m512d inv = _mm512_set1_pd(inv_scale);
    __m512 v = _mm512_loadu_ps(x);
    __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    _mm_storeu_si128((__m128i *)o, quantize8x2_pd(lo, hi, inv));
}
static inline void quantize16_f64(const double *x, double inv_scale, uint8_t *o) {
    const __m512d inv = _mm512_set1_pd(inv_scale);
    _mm_storeu_si128((__m128i *)o, quantize8x2_pd(_mm512_loadu_pd(x), _mm512_loadu_pd(x + 8), inv));
}
#define HAVE_QUANTIZE16 1
#elif TA_ISA == 1
static inline __m128i quantize4_pd(__m256d v, __m256d inv) {
    v = _mm256_max_pd(_mm256_min_pd(_mm256_mul_pd(v, inv), _mm256_set1_pd(127.0)), _mm256_set1_pd(-127.0));
    return _mm256_cvtpd_epi32(v); /* MXCSR rounding: to nearest even unless a caller changed it */
}
static inline void quantize16_store(__m128i a, __m128i b, __m128i c, __m128i d, uint8_t *o) {
    __m128i bytes = _mm_packs_epi16(_mm_packs_epi32(a, b), _mm_packs_epi32(c, d)); /* in range: no saturation */
    _mm_storeu_si128((__m128i *)o, _mm_xor_si128(bytes, _mm_set1_epi8((char)0x80))); /* + 128 */
}
static inline void quantize16_f32(const float *x, double inv_scale, uint8_t *o) {
    const __m256d inv = _mm256_set1_pd(inv_scale);
    quantize16_store(quantize4_pd(_mm256_cvtps_pd(_mm_loadu_ps(x)), inv),
                     quantize4_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + 4)), inv),
                     quantize4_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + 8)), inv),
                     quantize4_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + 12)), inv), o);
}
static inline void quantize16_f64(const double *x, double inv_scale, uint8_t *o) {
    const __m256d inv = _mm256_set1_pd(inv_scale);
    quantize16_store(quantize4_pd(_mm256_loadu_pd(x), inv), quantize4_pd(_mm256_loadu_pd(x + 4), inv),
                     quantize4_pd(_mm256_loadu_pd(x + 8), inv), quantize4_pd(_mm256_loadu_pd(x + 12), inv), o);
}
#define HAVE_QUANTIZE16 1
#else
#define HAVE_QUANTIZE16 0
#define quantize16_f32(x, inv, o) ((void)0)
#define quantize16_f64(x, inv, o) ((void)0)
#endif
#define ta_quantize_f32_16 quantize16_f32
#define ta_quantize_f64_16 quantize16_f64

/* 16 x 16 byte transpose: dst[j*dstride + i] = src[i*sstride + j]. With SSE2, four rounds of
 * unpacking row v with row v+8 (each round rotates the 8-bit (row, byte) index left by one bit). */
static inline void transpose16x16(const uint8_t *src, int64_t sstride, uint8_t *dst, int64_t dstride) {
#if defined(__SSE2__)
    __m128i v[16], u[16];
    for (int i = 0; i < 16; i++) v[i] = _mm_loadu_si128((const __m128i *)(src + i * sstride));
    for (int round = 0; round < 4; round++) {
        for (int i = 0; i < 8; i++) {
            u[2 * i] = _mm_unpacklo_epi8(v[i], v[i + 8]);
            u[2 * i + 1] = _mm_unpackhi_epi8(v[i], v[i + 8]);
        }
        for (int i = 0; i < 16; i++) v[i] = u[i];
    }
    for (int i = 0; i < 16; i++) _mm_storeu_si128((__m128i *)(dst + i * dstride), v[i]);
#else
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) dst[j * dstride + i] = src[i * sstride + j];
#endif
}

#define QUANT_ROW_BLOCK 64 /* positions quantized per channel before transposing */
/* x (N, C, H, W) with strides (sn, sc, sh, sw) -> out (N, H, W, C) bytes.
 * NCHW planes (sw == 1, sh == w): 16 channels x 64 positions quantized at a time, then 16 x 16 byte
 * transposes; tasks are (image, 16-channel block). Channels-last rows (sc == 1): contiguous runs;
 * tasks are (image, row). Any other strides: one value at a time. */
#define DEFINE_QUANTIZE(NAME, T)                                                                         \
    static inline void NAME##_run(const T *restrict x, int64_t len, double inv_scale, uint8_t *restrict o) { \
        int64_t k = 0;                                                                                   \
        if (HAVE_QUANTIZE16)                                                                             \
            for (; k + 16 <= len; k += 16) NAME##_16(x + k, inv_scale, o + k);                           \
        for (; k < len; k++) o[k] = quantize_one((double)x[k] * inv_scale);                              \
    }                                                                                                    \
    void NAME(const T *x, int64_t n, int64_t c, int64_t h, int64_t w, int64_t sn, int64_t sc,            \
              int64_t sh, int64_t sw, double inv_scale, uint8_t *out, int nthreads) {                    \
        if (sw == 1 && sh == w && sc != 1) {                                                             \
            const int64_t hw = h * w, blocks = (c + 15) / 16;                                            \
            _Pragma("omp parallel for collapse(2) schedule(static) num_threads(nthreads)")               \
            for (int64_t i = 0; i < n; i++)                                                              \
                for (int64_t cb = 0; cb < blocks; cb++) {                                                \
                    const int64_t c0 = cb * 16;                                                          \
                    const T *plane = x + i * sn + c0 * sc;                                               \
                    uint8_t *o = out + i * hw * c + c0;                                                  \
                    if (c0 + 16 > c) { /* last, partial block */                                         \
                        for (int64_t ch = 0; ch < c - c0; ch++)                                          \
                            for (int64_t p = 0; p < hw; p++)                                             \
                                o[p * c + ch] = quantize_one((double)plane[ch * sc + p] * inv_scale);    \
                        continue;                                                                        \
                    }                                                                                    \
                    uint8_t tmp[16 * QUANT_ROW_BLOCK];                                                   \
                    for (int64_t p0 = 0; p0 < hw; p0 += QUANT_ROW_BLOCK) {                               \
                        const int64_t len = hw - p0 < QUANT_ROW_BLOCK ? hw - p0 : QUANT_ROW_BLOCK;       \
                        for (int64_t ch = 0; ch < 16; ch++)                                              \
                            NAME##_run(plane + ch * sc + p0, len, inv_scale, tmp + ch * QUANT_ROW_BLOCK); \
                        int64_t pp = 0;                                                                  \
                        for (; pp + 16 <= len; pp += 16)                                                 \
                            transpose16x16(tmp + pp, QUANT_ROW_BLOCK, o + (p0 + pp) * c, c);             \
                        for (; pp < len; pp++)                                                           \
                            for (int64_t ch = 0; ch < 16; ch++)                                          \
                                o[(p0 + pp) * c + ch] = tmp[ch * QUANT_ROW_BLOCK + pp];                  \
                    }                                                                                    \
                }                                                                                        \
            return;                                                                                      \
        }                                                                                                \
        _Pragma("omp parallel for collapse(2) schedule(static) num_threads(nthreads)")                   \
        for (int64_t i = 0; i < n; i++)                                                                  \
            for (int64_t y = 0; y < h; y++) {                                                            \
                uint8_t *o = out + (i * h + y) * w * c;                                                  \
                const T *row = x + i * sn + y * sh;                                                      \
                if (sc == 1 && sw == c) {                                                                \
                    NAME##_run(row, w * c, inv_scale, o);                                                \
                } else if (sc == 1) {                                                                    \
                    for (int64_t xw = 0; xw < w; xw++) NAME##_run(row + xw * sw, c, inv_scale, o + xw * c); \
                } else {                                                                                 \
                    for (int64_t xw = 0; xw < w; xw++)                                                   \
                        for (int64_t ch = 0; ch < c; ch++)                                               \
                            o[xw * c + ch] = quantize_one((double)row[xw * sw + ch * sc] * inv_scale);   \
                }                                                                                        \
            }                                                                                            \
    }

DEFINE_QUANTIZE(ta_quantize_f32, float)
DEFINE_QUANTIZE(ta_quantize_f64, double)

/* ------------------------------------------------------------------------------------------- */
/* im2col: NHWC uint8 (N, H, W, C) -> A [groups][m_pad][kpad]; a padded tap reads 128 (x_q = 0). */
/* ------------------------------------------------------------------------------------------- */

void ta_im2col(const uint8_t *xq, int64_t n, int64_t h, int64_t w, int64_t c, int64_t groups, int64_t kh,
               int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t ho,
               int64_t wo, int64_t m_pad, int64_t kpad, uint8_t *a, int nthreads) {
    const int64_t cg = c / groups, m = n * ho * wo;
#pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads)
    for (int64_t g = 0; g < groups; g++)
        for (int64_t row = 0; row < m_pad; row++) {
            uint8_t *dst = a + (g * m_pad + row) * kpad;
            if (row >= m) {
                memset(dst, TA_PAD_BYTE, (size_t)kpad);
                continue;
            }
            const int64_t img = row / (ho * wo), pix = row % (ho * wo), oy = pix / wo, ox = pix % wo;
            for (int64_t i = 0; i < kh; i++) {
                const int64_t iy = oy * sh - ph + i * dh;
                for (int64_t j = 0; j < kw; j++) {
                    const int64_t ix = ox * sw - pw + j * dw;
                    if (iy >= 0 && iy < h && ix >= 0 && ix < w)
                        memcpy(dst, xq + ((img * h + iy) * w + ix) * c + g * cg, (size_t)cg);
                    else
                        memset(dst, TA_PAD_BYTE, (size_t)cg);
                    dst += cg;
                }
            }
            memset(dst, TA_PAD_BYTE, (size_t)(kpad - kh * kw * cg));
        }
}


/* ------------------------------------------------------------------------------------------- */
/* The reduction and its epilogue.                                                               */
/* ------------------------------------------------------------------------------------------- */

enum { TA_OUT_F32 = 0, TA_OUT_F64 = 1, TA_OUT_I32 = 2 };

/* For each group g, position row < m and channel t < tg:
 *   sum = sum_k |A[g][row][k] - W(g, t, k)|
 * written at out + img*s_n + (g*tg + t)*s_c + pix*s_p (row = img*hw + pix) as
 *   out_kind 0/1: bias[ch] - scale[ch] * sum in float32/float64, ch = g*tg + t (bias may be NULL; scale per
 *                 output channel: the layer's scale s, times a folded BatchNorm's factor), computed in double;
 *   out_kind 2:   the int32 sum itself.
 * m_pad must be a multiple of mr and of nothing else; mc a multiple of mr; nr and nc multiples of 8
 * (nr <= 32); tg_pad, kpad and kc multiples of 8. Returns 0, -1 for blocking it does not accept (the
 * caller checks first), -2 if a tile could not be allocated. */
int ta_sad_forward(const uint8_t *a, int64_t m, int64_t m_pad, const uint8_t *wt, int64_t tg, int64_t tg_pad,
                   int64_t groups, int64_t kpad, int64_t hw, void *out, int out_kind, int64_t s_n, int64_t s_c,
                   int64_t s_p, const double *bias, const double *scale, int mr, int nr, int64_t mc, int64_t nc,
                   int64_t kc, int nthreads) {
    if (pick_micro(mr, nr / 8) == NULL || nr % 8 || mc <= 0 || nc <= 0 || kc <= 0 || mc % mr || nc % 8 ||
        m_pad % mr || tg_pad % 8 || kc % 8 || kpad % 8 || out_kind < 0 || out_kind > 2)
        return -1;
    const int64_t nmb = (m_pad + mc - 1) / mc, nnb = (tg_pad + nc - 1) / nc, tasks = groups * nmb * nnb;
    const int64_t gstride = kpad * 8; /* bytes per 8-channel weight group */
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        int32_t *tile = (int32_t *)malloc((size_t)(mc * nc) * sizeof(int32_t));
        if (tile == NULL) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            if (tile == NULL) continue;
            const int64_t g = task / (nmb * nnb), rest = task % (nmb * nnb), mb = rest / nnb, nb = rest % nnb;
            const int64_t m0 = mb * mc, t0 = nb * nc;
            const int64_t rows = (m0 + mc < m_pad ? mc : m_pad - m0), cols = (t0 + nc < tg_pad ? nc : tg_pad - t0);
            /* the first K chunk stores every tile entry (rows and cols are multiples of mr and 8), later ones add */
            const uint8_t *ablock = a + (g * m_pad + m0) * kpad;
            const uint8_t *wblock = wt + (g * (tg_pad / 8) + t0 / 8) * gstride;
            for (int64_t k0 = 0; k0 < kpad; k0 += kc) {
                const int64_t kl = k0 + kc < kpad ? kc : kpad - k0;
                for (int64_t t = 0; t < cols; t += nr) {
                    const int64_t width = cols - t < nr ? cols - t : nr; /* a multiple of 8 */
                    micro_fn micro = pick_micro(mr, (int)(width / 8));
                    for (int64_t r = 0; r < rows; r += mr)
                        micro(ablock + r * kpad + k0, kpad, wblock + (t / 8) * gstride + k0 * 8, gstride, kl,
                              tile + t * rows + r, rows, k0 > 0);
                }
            }
            const int64_t t_end = (t0 + cols < tg ? t0 + cols : tg), r_end = (m0 + rows < m ? m0 + rows : m);
            if (s_c == 1 && s_p != 1) { /* channels-last output: channels contiguous */
                for (int64_t r = m0; r < r_end; r++) {
                    const int64_t img = r / hw, pix = r % hw, off = img * s_n + pix * s_p + g * tg;
                    const int32_t *src = tile + (r - m0);
                    for (int64_t t = t0; t < t_end; t++) {
                        const int32_t sum = src[(t - t0) * rows];
                        if (out_kind == TA_OUT_I32)
                            ((int32_t *)out)[off + t] = sum;
                        else {
                            const double y = (bias != NULL ? bias[g * tg + t] : 0.0) - scale[g * tg + t] * (double)sum;
                            if (out_kind == TA_OUT_F64)
                                ((double *)out)[off + t] = y;
                            else
                                ((float *)out)[off + t] = (float)y;
                        }
                    }
                }
            } else {
                for (int64_t t = t0; t < t_end; t++) {
                    const int64_t ch = g * tg + t;
                    const double b = bias != NULL ? bias[ch] : 0.0, scale_ch = scale[ch];
                    const int32_t *column = tile + (t - t0) * rows;
                    /* runs of positions within one image: contiguous in the output when s_p == 1 (NCHW) */
                    for (int64_t r = m0; r < r_end;) {
                        const int64_t img = r / hw, pix = r % hw;
                        const int64_t len = (hw - pix < r_end - r) ? hw - pix : r_end - r;
                        const int32_t *src = column + (r - m0);
                        const int64_t off = img * s_n + ch * s_c + pix * s_p;
                        if (out_kind == TA_OUT_I32) {
                            int32_t *dst = (int32_t *)out + off;
                            for (int64_t q = 0; q < len; q++) dst[q * s_p] = src[q];
                        } else if (out_kind == TA_OUT_F64) {
                            double *dst = (double *)out + off;
                            if (s_p == 1)
                                for (int64_t q = 0; q < len; q++) dst[q] = b - scale_ch * (double)src[q];
                            else
                                for (int64_t q = 0; q < len; q++) dst[q * s_p] = b - scale_ch * (double)src[q];
                        } else {
                            float *dst = (float *)out + off;
                            if (s_p == 1)
                                for (int64_t q = 0; q < len; q++) dst[q] = (float)(b - scale_ch * (double)src[q]);
                            else
                                for (int64_t q = 0; q < len; q++) dst[q * s_p] = (float)(b - scale_ch * (double)src[q]);
                        }
                        r += len;
                    }
                }
            }
        }
        free(tile);
    }
    return failed ? -2 : 0;
}
