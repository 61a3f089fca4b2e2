/* Batch-1 matrix-vector product over HQQ-packed weights, on the CPU, reading the packing in place.

   y[n] = sum_k x[k] * W[n, k],  W[n, k] = (q[n, k] - z[n, m]) * s[n, m],  m = k / G

   The layout is moe_offload.quant.pack's (int32 words, row-major [N, K*bits/32]) and hqq's metadata
   (float16 [N, M], or 8-bit codes [N, M] with float16 step/offset [N, M/B], or 4-bit codes sharing one
   byte per group: the scale's in the low nibble, the zero's in the high one). Nothing is converted at load
   time, so the CPU path costs no host memory beyond the expert store the GPU copies come from.

   Per group the zero point factors out: sum_k (q - z) s x = s * (sum_k q x - z * sum_k x), so the inner
   loop is one multiply-add per weight. Rows go 16 at a time so that the compiler vectorizes across rows
   (one SIMD lane per row), and threads split the row blocks. Built by moe_offload.kernels.cpu with
   -O3 -march=native; moe_offload.kernels.cpu.hqq_matvec_reference is the PyTorch reference. */

#include <stdint.h>
#include <string.h>

#ifdef __AVX512F__
#define R 16 /* rows per block: one SIMD register of floats */
#else
#define R 8
#endif

typedef struct {
    int n, k, bits, group;
    const uint32_t *qweight;
    int meta_bits; /* 0: float16 scale/zero [N, M]; 8 or 4: codes [N, M] + float16 step/offset [N, M/B] */
    const uint16_t *scale, *zero;
    const uint8_t *scale_q, *zero_q; /* 4-bit: both point at the shared bytes */
    const uint16_t *scale_step, *scale_offset, *zero_step, *zero_offset;
    int meta_block;
} hqq_matrix;

/* GCC/Clang vector extensions: one lane per row; compiled to AVX-512, AVX2 or SSE by -march=native. */
typedef uint32_t u32x16 __attribute__((vector_size(R * 4)));
typedef int32_t i32x16 __attribute__((vector_size(R * 4)));
typedef float f32x16 __attribute__((vector_size(R * 4)));

static inline u32x16 gather_words(const uint32_t *q, size_t stride, size_t col) {
    u32x16 v;
    for (int r = 0; r < R; r++) v[r] = q[(size_t)r * stride + col];
    return v;
}

#define CODES(v, shift, mask) __builtin_convertvector((i32x16)(((v) >> (shift)) & (mask)), f32x16)

/* Four independent accumulators: one chain of dependent multiply-adds would wait on FMA latency. */
typedef struct { f32x16 a0, a1, a2, a3; } acc4;

/* acc += q[n0+r, 16c + j] * x[j] for j < 16, per row r (chunk c of 16 codes). */
static inline void chunk_dot(const hqq_matrix *w, int n0, int c, const float *x, acc4 *d) {
    const int K = w->k;
    const size_t words = (size_t)K * w->bits / 32;
    const uint32_t *q = w->qweight + (size_t)n0 * words;
    switch (w->bits) {
    case 2: {
        const u32x16 a = gather_words(q, words, c);
        for (int j = 0; j < 16; j += 4) {
            d->a0 += CODES(a, 2 * j, 3u) * x[j];
            d->a1 += CODES(a, 2 * j + 2, 3u) * x[j + 1];
            d->a2 += CODES(a, 2 * j + 4, 3u) * x[j + 2];
            d->a3 += CODES(a, 2 * j + 6, 3u) * x[j + 3];
        }
        break;
    }
    case 3: { /* low 2 bits as 2-bit codes, then a plane of high bits: element k at bit k % 32 of word K/16 + k/32 */
        const u32x16 a = gather_words(q, words, c);
        const u32x16 b = (gather_words(q, words, K / 16 + c / 2) >> (16 * (c & 1))) << 2;
#define CODE3(j) __builtin_convertvector((i32x16)(((a >> (2 * (j))) & 3u) | ((b >> (j)) & 4u)), f32x16)
        for (int j = 0; j < 16; j += 4) {
            d->a0 += CODE3(j) * x[j];
            d->a1 += CODE3(j + 1) * x[j + 1];
            d->a2 += CODE3(j + 2) * x[j + 2];
            d->a3 += CODE3(j + 3) * x[j + 3];
        }
        break;
    }
    case 4: {
        const u32x16 a = gather_words(q, words, 2 * c), b = gather_words(q, words, 2 * c + 1);
        for (int j = 0; j < 8; j += 2) {
            d->a0 += CODES(a, 4 * j, 15u) * x[j];
            d->a1 += CODES(a, 4 * j + 4, 15u) * x[j + 1];
            d->a2 += CODES(b, 4 * j, 15u) * x[8 + j];
            d->a3 += CODES(b, 4 * j + 4, 15u) * x[9 + j];
        }
        break;
    }
    default: /* 8 */
        for (int h = 0; h < 4; h++) {
            const u32x16 a = gather_words(q, words, 4 * c + h);
            d->a0 += CODES(a, 0, 255u) * x[4 * h];
            d->a1 += CODES(a, 8, 255u) * x[4 * h + 1];
            d->a2 += CODES(a, 16, 255u) * x[4 * h + 2];
            d->a3 += CODES(a, 24, 255u) * x[4 * h + 3];
        }
    }
}

static inline f32x16 half_to_float(u32x16 h) {
    /* Exponent rebias by multiplication: exact for normal and subnormal halfs (meta is finite). */
    f32x16 f = (f32x16)((h & 0x7fffu) << 13) * 5.192296858534828e+33f; /* 2^112 */
    return (f32x16)((u32x16)f | ((h & 0x8000u) << 16));
}

static inline u32x16 gather_u16(const uint16_t *p, size_t stride, size_t col) {
    u32x16 v;
    for (int r = 0; r < R; r++) v[r] = p[(size_t)r * stride + col];
    return v;
}

/* A metadata code from its byte. nib: 0 the whole byte (8-bit codes), 1 the low nibble, 2 the high one. */
static inline int code_of(int byte, int nib) { return nib == 0 ? byte : nib == 1 ? byte & 15 : byte >> 4; }

/* Which part of its byte a matrix's scale (zero = 0) or zero (zero = 1) code is, as code_of's nib. */
static inline int nib_of(const hqq_matrix *w, int zero) { return w->meta_bits == 4 ? 1 + zero : 0; }

static inline f32x16 gather_code(const uint8_t *p, size_t stride, size_t col, int nib) {
    i32x16 v;
    for (int r = 0; r < R; r++) v[r] = code_of(p[(size_t)r * stride + col], nib);
    return __builtin_convertvector(v, f32x16);
}

/* Scale and zero of rows n0 .. n0+15: float16 per group, or 8-bit codes with a float16 step and
   offset per block of groups (the block's step/offset are converted once, not per group). */
typedef struct { f32x16 s_step, s_offset, z_step, z_offset; size_t block; } meta_cache;

static inline void load_meta(const hqq_matrix *w, int n0, size_t m, f32x16 *s, f32x16 *z, meta_cache *mc) {
    const size_t M = w->k / w->group;
    if (!w->meta_bits) {
        *s = half_to_float(gather_u16(w->scale + n0 * M, M, m));
        *z = half_to_float(gather_u16(w->zero + n0 * M, M, m));
        return;
    }
    const size_t MB = M / w->meta_block, b = m / w->meta_block;
    if (b != mc->block) {
        mc->block = b;
        mc->s_step = half_to_float(gather_u16(w->scale_step + n0 * MB, MB, b));
        mc->s_offset = half_to_float(gather_u16(w->scale_offset + n0 * MB, MB, b));
        mc->z_step = half_to_float(gather_u16(w->zero_step + n0 * MB, MB, b));
        mc->z_offset = half_to_float(gather_u16(w->zero_offset + n0 * MB, MB, b));
    }
    *s = gather_code(w->scale_q + n0 * M, M, m, nib_of(w, 0)) * mc->s_step + mc->s_offset;
    *z = gather_code(w->zero_q + n0 * M, M, m, nib_of(w, 1)) * mc->z_step + mc->z_offset;
}

static void row_block(const hqq_matrix *w, int n0, const float *x, const float *xsum, float *y) {
    const int M = w->k / w->group, chunks = w->group / 16;
    f32x16 acc = {0}, s, z;
    meta_cache mc = {.block = (size_t)-1};
    for (int m = 0; m < M; m++) {
        acc4 d = {{0}, {0}, {0}, {0}};
        for (int c = 0; c < chunks; c++) chunk_dot(w, n0, m * chunks + c, x + (size_t)(m * chunks + c) * 16, &d);
        const f32x16 dot = (d.a0 + d.a1) + (d.a2 + d.a3);
        load_meta(w, n0, m, &s, &z, &mc);
        acc += s * (dot - z * xsum[m]);
    }
    memcpy(y + n0, &acc, sizeof(acc));
}

/* x: float32 [K]; xsum: float32 [K/G] (sum of x over each group); y: float32 [N]. N % 16 == 0, G % 16 == 0. */
void hqq_matvec(const hqq_matrix *w, const float *x, const float *xsum, float *y, int threads) {
    const int blocks = w->n / R;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < blocks; b++) row_block(w, b * R, x, xsum, y);
}

/* ---------------------------------------------------------------------------------------------
   Fast path for 2-bit codes in groups of 16 (the 4/2 preset's experts): integer dot products.

   x is quantized to int8 once per call, per group of 16 (dx = max|x| / 127), so a group's dot
   product sum_k q_k x8_k is exact integer arithmetic, and
       y[n] = sum_g s_g dx_g (sum_k q_k x8_k - z_g sum_k x8_k).
   The only new error is x's rounding to 8 bits (about 0.4% per element, relative to the group's
   largest; llama.cpp rounds activations the same way for its CPU experts).

   A 32-byte load holds 128 codes (8 words, 8 groups). Byte b of it, shifted right by 2t and masked
   to 2 bits, is the code of element 4b + t, so x8 is stored permuted to match: xp[128c + 32t + b] =
   x8[128c + 4b + t]. u8 x s8 products of 4 adjacent bytes add into one int32 lane, and lane l's
   bytes 4l..4l+3 are exactly group l of the chunk: four multiply-adds give eight group dots.
   AVX-512 VNNI / AVX-VNNI do that in one instruction (vpdpbusd), AVX2 in two (maddubs, madd).
   --------------------------------------------------------------------------------------------- */
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#include <math.h>

int hqq_has_int8(void) { return 1; }

static inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

/* x: float32 [K] -> xp: int8 [K] (permuted as above for chunks of `chunk` codes: 128 for 256-bit loads, 256
   for 512-bit ones), dx: float32 [K/16] (step), xs: float32 [K/16] (sum of x8). */
static inline void quantize_group(const float *v, int g, int chunk, int8_t *xp, float *dx, float *xs) {
    const int lanes = chunk / 4; /* bytes of codes per load */
    float amax = 0.0f;
    for (int j = 0; j < 16; j++) amax = fmaxf(amax, fabsf(v[j]));
    const float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int sum = 0;
    for (int j = 0; j < 16; j++) {
        const int e = 16 * g + j, c = e / chunk, r = e % chunk;
        int q = (int)lrintf(v[j] * inv);
        q = q > 127 ? 127 : (q < -127 ? -127 : q);
        xp[chunk * c + lanes * (r % 4) + r / 4] = (int8_t)q;
        sum += q;
    }
    dx[g] = d;
    xs[g] = (float)sum;
}

void hqq_quantize_x16(const float *x, int k, int chunk, int8_t *xp, float *dx, float *xs) {
    for (int g = 0; g < k / 16; g++) quantize_group(x + 16 * g, g, chunk, xp, dx, xs);
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float half1(uint16_t h) { return _cvtsh_ss(h); }

/* Eight groups' int32 dots q . x8 of one row's 32 bytes of codes against the chunk's 128 bytes of permuted x8. */
static inline __m256i chunk_dots(const uint8_t *q, __m256i x0, __m256i x1, __m256i x2, __m256i x3) {
    const __m256i mask = _mm256_set1_epi8(3);
    const __m256i v = _mm256_loadu_si256((const __m256i *)q);
    __m256i d = dot_u8s8(_mm256_setzero_si256(), _mm256_and_si256(v, mask), x0);
    d = dot_u8s8(d, _mm256_and_si256(_mm256_srli_epi16(v, 2), mask), x1);
    d = dot_u8s8(d, _mm256_and_si256(_mm256_srli_epi16(v, 4), mask), x2);
    return dot_u8s8(d, _mm256_and_si256(_mm256_srli_epi16(v, 6), mask), x3);
}

/* Row n's scale and zero of groups m .. m+7 (plain float16 metadata). */
static inline void meta_f16(const hqq_matrix *w, size_t m, __m256 *s, __m256 *z) {
    *s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w->scale + m)));
    *z = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w->zero + m)));
}

/* Eight consecutive metadata codes as floats (nib as in code_of). */
static inline __m256 u8x8(const uint8_t *p, int nib) {
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    if (nib == 1) v = _mm256_and_si256(v, _mm256_set1_epi32(15));
    else if (nib == 2) v = _mm256_srli_epi32(v, 4);
    return _mm256_cvtepi32_ps(v);
}

/* Rows [n0, n1) of a 2-bit group-16 matrix, two rows at a time (each x load serves both). Requires K % 128
   == 0 and, for 8-bit metadata, a block of groups that is a multiple of 8: eight consecutive groups then
   share one step/offset, loaded once per block (the loops run block by block: no division per chunk). */
static void rows_2bit_g16(const hqq_matrix *w, int n0, int n1, const int8_t *xp, const float *dx, const float *xs,
                          float *y) {
    const int K = w->k, M = K / 16, chunks = K / 128;
    const int per_block = w->meta_bits ? w->meta_block / 8 : chunks; /* chunks per metadata block */
    const int sn = nib_of(w, 0), zn = nib_of(w, 1);
    const size_t row_bytes = (size_t)K / 4;
    for (int n = n0; n < n1; n += 2) {
        const int two = n + 1 < n1;
        const int n2 = two ? n + 1 : n; /* an odd last row is computed twice, stored once */
        const uint8_t *qa = (const uint8_t *)w->qweight + (size_t)n * row_bytes;
        const uint8_t *qb = (const uint8_t *)w->qweight + (size_t)n2 * row_bytes;
        __m256 acc_a = _mm256_setzero_ps(), acc_b = _mm256_setzero_ps();
        for (int c0 = 0; c0 < chunks; c0 += per_block) {
            __m256 ssa = _mm256_setzero_ps(), soa = ssa, zsa = ssa, zoa = ssa, ssb = ssa, sob = ssa, zsb = ssa, zob = ssa;
            if (w->meta_bits) {
                const int MB = M / w->meta_block, b = c0 / per_block;
                const size_t ia = (size_t)n * MB + b, ib = (size_t)n2 * MB + b;
                ssa = _mm256_set1_ps(half1(w->scale_step[ia])); soa = _mm256_set1_ps(half1(w->scale_offset[ia]));
                zsa = _mm256_set1_ps(half1(w->zero_step[ia])); zoa = _mm256_set1_ps(half1(w->zero_offset[ia]));
                ssb = _mm256_set1_ps(half1(w->scale_step[ib])); sob = _mm256_set1_ps(half1(w->scale_offset[ib]));
                zsb = _mm256_set1_ps(half1(w->zero_step[ib])); zob = _mm256_set1_ps(half1(w->zero_offset[ib]));
            }
            for (int c = c0; c < c0 + per_block; c++) {
                const int8_t *xc = xp + 128 * c;
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)xc);
                const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xc + 32));
                const __m256i x2 = _mm256_loadu_si256((const __m256i *)(xc + 64));
                const __m256i x3 = _mm256_loadu_si256((const __m256i *)(xc + 96));
                const __m256 da = _mm256_cvtepi32_ps(chunk_dots(qa + 32 * c, x0, x1, x2, x3));
                const __m256 db = _mm256_cvtepi32_ps(chunk_dots(qb + 32 * c, x0, x1, x2, x3));
                const size_t ma = (size_t)n * M + 8 * c, mb = (size_t)n2 * M + 8 * c;
                __m256 sa, za, sb, zb;
                if (w->meta_bits) {
                    sa = _mm256_fmadd_ps(u8x8(w->scale_q + ma, sn), ssa, soa);
                    za = _mm256_fmadd_ps(u8x8(w->zero_q + ma, zn), zsa, zoa);
                    sb = _mm256_fmadd_ps(u8x8(w->scale_q + mb, sn), ssb, sob);
                    zb = _mm256_fmadd_ps(u8x8(w->zero_q + mb, zn), zsb, zob);
                } else {
                    meta_f16(w, ma, &sa, &za);
                    meta_f16(w, mb, &sb, &zb);
                }
                const __m256 xsum = _mm256_loadu_ps(xs + 8 * c), step = _mm256_loadu_ps(dx + 8 * c);
                acc_a = _mm256_fmadd_ps(_mm256_mul_ps(sa, step), _mm256_fnmadd_ps(za, xsum, da), acc_a);
                acc_b = _mm256_fmadd_ps(_mm256_mul_ps(sb, step), _mm256_fnmadd_ps(zb, xsum, db), acc_b);
            }
        }
        y[n] = hsum8(acc_a);
        if (two) y[n2] = hsum8(acc_b);
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
/* The same product with 512-bit vectors: a 64-byte load holds 256 codes (two 128-code chunks, 16 groups), so
   every instruction does twice the work of the 256-bit path's (x permuted for chunks of 256). Requires
   K % 256 == 0 and, for 8-bit metadata, blocks of a multiple of 16 groups. `prefetch`: bytes ahead in each
   row's codes to prefetch into L1 (0: leave it to the hardware prefetchers). */
int hqq_has_avx512(void) { return 1; }

static inline __m512i pair_dots(const uint8_t *q, __m512i x0, __m512i x1, __m512i x2, __m512i x3) {
    const __m512i mask = _mm512_set1_epi8(3);
    const __m512i v = _mm512_loadu_si512((const void *)q);
    __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(v, mask), x0);
    d = _mm512_dpbusd_epi32(d, _mm512_and_si512(_mm512_srli_epi16(v, 2), mask), x1);
    d = _mm512_dpbusd_epi32(d, _mm512_and_si512(_mm512_srli_epi16(v, 4), mask), x2);
    return _mm512_dpbusd_epi32(d, _mm512_and_si512(_mm512_srli_epi16(v, 6), mask), x3);
}

static inline __m512 u8x16(const uint8_t *p, int nib) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    if (nib == 1) v = _mm512_and_si512(v, _mm512_set1_epi32(15));
    else if (nib == 2) v = _mm512_srli_epi32(v, 4);
    return _mm512_cvtepi32_ps(v);
}

static void rows_2bit_g16_512(const hqq_matrix *w, int n0, int n1, const int8_t *xp, const float *dx,
                              const float *xs, float *y, int prefetch) {
    const int K = w->k, M = K / 16, pairs = K / 256;
    const int per_block = w->meta_bits ? w->meta_block / 16 : pairs;
    const int sn = nib_of(w, 0), zn = nib_of(w, 1);
    const size_t row_bytes = (size_t)K / 4;
    for (int n = n0; n < n1; n += 2) {
        const int two = n + 1 < n1;
        const int n2 = two ? n + 1 : n;
        const uint8_t *qa = (const uint8_t *)w->qweight + (size_t)n * row_bytes;
        const uint8_t *qb = (const uint8_t *)w->qweight + (size_t)n2 * row_bytes;
        __m512 acc_a = _mm512_setzero_ps(), acc_b = _mm512_setzero_ps();
        for (int c0 = 0; c0 < pairs; c0 += per_block) {
            __m512 ssa = _mm512_setzero_ps(), soa = ssa, zsa = ssa, zoa = ssa, ssb = ssa, sob = ssa, zsb = ssa, zob = ssa;
            if (w->meta_bits) {
                const int MB = M / w->meta_block, b = c0 / per_block;
                const size_t ia = (size_t)n * MB + b, ib = (size_t)n2 * MB + b;
                ssa = _mm512_set1_ps(half1(w->scale_step[ia])); soa = _mm512_set1_ps(half1(w->scale_offset[ia]));
                zsa = _mm512_set1_ps(half1(w->zero_step[ia])); zoa = _mm512_set1_ps(half1(w->zero_offset[ia]));
                ssb = _mm512_set1_ps(half1(w->scale_step[ib])); sob = _mm512_set1_ps(half1(w->scale_offset[ib]));
                zsb = _mm512_set1_ps(half1(w->zero_step[ib])); zob = _mm512_set1_ps(half1(w->zero_offset[ib]));
            }
            for (int c = c0; c < c0 + per_block; c++) {
                if (prefetch) {
                    _mm_prefetch((const char *)(qa + 64 * c + prefetch), _MM_HINT_T0);
                    _mm_prefetch((const char *)(qb + 64 * c + prefetch), _MM_HINT_T0);
                }
                const int8_t *xc = xp + 256 * c;
                const __m512i x0 = _mm512_loadu_si512((const void *)xc);
                const __m512i x1 = _mm512_loadu_si512((const void *)(xc + 64));
                const __m512i x2 = _mm512_loadu_si512((const void *)(xc + 128));
                const __m512i x3 = _mm512_loadu_si512((const void *)(xc + 192));
                const __m512 da = _mm512_cvtepi32_ps(pair_dots(qa + 64 * c, x0, x1, x2, x3));
                const __m512 db = _mm512_cvtepi32_ps(pair_dots(qb + 64 * c, x0, x1, x2, x3));
                const size_t ma = (size_t)n * M + 16 * c, mb = (size_t)n2 * M + 16 * c;
                __m512 sa, za, sb, zb;
                if (w->meta_bits) {
                    sa = _mm512_fmadd_ps(u8x16(w->scale_q + ma, sn), ssa, soa);
                    za = _mm512_fmadd_ps(u8x16(w->zero_q + ma, zn), zsa, zoa);
                    sb = _mm512_fmadd_ps(u8x16(w->scale_q + mb, sn), ssb, sob);
                    zb = _mm512_fmadd_ps(u8x16(w->zero_q + mb, zn), zsb, zob);
                } else {
                    sa = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w->scale + ma)));
                    za = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w->zero + ma)));
                    sb = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w->scale + mb)));
                    zb = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w->zero + mb)));
                }
                const __m512 xsum = _mm512_loadu_ps(xs + 16 * c), step = _mm512_loadu_ps(dx + 16 * c);
                acc_a = _mm512_fmadd_ps(_mm512_mul_ps(sa, step), _mm512_fnmadd_ps(za, xsum, da), acc_a);
                acc_b = _mm512_fmadd_ps(_mm512_mul_ps(sb, step), _mm512_fnmadd_ps(zb, xsum, db), acc_b);
            }
        }
        y[n] = _mm512_reduce_add_ps(acc_a);
        if (two) y[n2] = _mm512_reduce_add_ps(acc_b);
    }
}
#else
int hqq_has_avx512(void) { return 0; }
#endif

/* Rows [n0, n1) at the width that x was permuted for: chunks of 256 codes run the 512-bit path (where built),
   128 the 256-bit one. */
static inline void rows_any(const hqq_matrix *w, int n0, int n1, const int8_t *xp, const float *dx, const float *xs,
                            float *y, int chunk, int prefetch) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
    if (chunk == 256) {
        rows_2bit_g16_512(w, n0, n1, xp, dx, xs, y, prefetch);
        return;
    }
#endif
    (void)chunk; (void)prefetch;
    rows_2bit_g16(w, n0, n1, xp, dx, xs, y);
}

/* y = W x for a 2-bit group-16 matrix, x given quantized by hqq_quantize_x16 with chunks of `chunk` codes. */
void hqq_matvec_2bit_g16(const hqq_matrix *w, const int8_t *xp, const float *dx, const float *xs, float *y,
                         int chunk, int prefetch, int threads) {
    const int rows = 16, blocks = (w->n + rows - 1) / rows;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < blocks; b++) {
        const int n1 = (b + 1) * rows < w->n ? (b + 1) * rows : w->n;
        rows_any(w, b * rows, n1, xp, dx, xs, y, chunk, prefetch);
    }
}

/* One layer's CPU experts in one parallel region: y[e] = down_e(silu(gate_e x) * up_e x) for e < n, every matrix
   2-bit group 16 with the shapes of expert 0 (gate/up [I, D], down [D, I]). One fork and one barrier per layer: x is
   rounded to int8 before the fork (on the calling thread: D values), and whoever computes a block of 16 rows of gate
   also computes those of up, then those 16 hidden units and their int8 group, so down waits only for the barrier
   between the two loops. (Idle workers sleep, OMP_WAIT_POLICY=PASSIVE: every barrier costs wake-ups.) The blocks of
   all experts are shared out together, so n experts keep every thread busy as one expert would. Work buffers: xq int8
   [D], xd/xsum float [D/16], g/u float [n*I], hq int8 [n*I], hd/hsum float [n*I/16]; y float [n*D].
   down == NULL: stop at the hidden units, y float [n*I] = silu(gate_e x) * up_e x (the first I hidden units of a
   split expert, whose gate/up structs then cover only those rows; hq, hd and hsum are unused). */
void hqq_experts_2bit_g16(const hqq_matrix *gate, const hqq_matrix *up, const hqq_matrix *down, int n, const float *x,
                          int chunk, int prefetch, int8_t *xq, float *xd, float *xsum, float *g, float *u,
                          int8_t *hq, float *hd, float *hsum, float *y, int threads) {
    const int D = gate[0].k, I = gate[0].n, rows = 16;
    const int up_blocks = I / rows, down_blocks = D / rows;
    hqq_quantize_x16(x, D, chunk, xq, xd, xsum);
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int b = 0; b < n * up_blocks; b++) { /* expert-major: a thread's blocks are contiguous rows */
            const int e = b / up_blocks, rb = b % up_blocks;
            float *ge = g + (size_t)e * I, *ue = u + (size_t)e * I;
            rows_any(&gate[e], rb * rows, rb * rows + rows, xq, xd, xsum, ge, chunk, prefetch);
            rows_any(&up[e], rb * rows, rb * rows + rows, xq, xd, xsum, ue, chunk, prefetch);
            float h[16];
            const float *gb = ge + rows * rb, *ub = ue + rows * rb;
            float *he = down ? h : y + (size_t)e * I + rows * rb;
            for (int j = 0; j < 16; j++) he[j] = gb[j] / (1.0f + expf(-gb[j])) * ub[j];
            if (down) quantize_group(h, rb, chunk, hq + (size_t)e * I, hd + (size_t)e * (I / 16), hsum + (size_t)e * (I / 16));
        }
#pragma omp for schedule(static)
        for (int b = 0; b < (down ? n * down_blocks : 0); b++) {
            const int e = b / down_blocks, rb = b % down_blocks;
            rows_any(&down[e], rb * rows, rb * rows + rows, hq + (size_t)e * I, hd + (size_t)e * (I / 16),
                     hsum + (size_t)e * (I / 16), y + (size_t)e * D, chunk, prefetch);
        }
    }
}
#else
int hqq_has_int8(void) { return 0; }
int hqq_has_avx512(void) { return 0; }
void hqq_quantize_x16(const float *x, int k, int chunk, int8_t *xp, float *dx, float *xs) {
    (void)x; (void)k; (void)chunk; (void)xp; (void)dx; (void)xs;
}
void hqq_matvec_2bit_g16(const hqq_matrix *w, const int8_t *xp, const float *dx, const float *xs, float *y,
                         int chunk, int prefetch, int threads) {
    (void)w; (void)xp; (void)dx; (void)xs; (void)y; (void)chunk; (void)prefetch; (void)threads;
}
void hqq_experts_2bit_g16(const hqq_matrix *gate, const hqq_matrix *up, const hqq_matrix *down, int n, const float *x,
                          int chunk, int prefetch, int8_t *xq, float *xd, float *xsum, float *g, float *u,
                          int8_t *hq, float *hd, float *hsum, float *y, int threads) {
    (void)gate; (void)up; (void)down; (void)n; (void)x; (void)chunk; (void)prefetch; (void)xq; (void)xd; (void)xsum;
    (void)g; (void)u; (void)hq; (void)hd; (void)hsum; (void)y; (void)threads;
}
#endif

/* hqq_experts_2bit_g16 on the library's own worker thread: submit returns at once, wait blocks until the call is done
   and returns its time in ms. A caller in Python then never needs the interpreter lock on the worker's side: a Python
   worker thread would wait for it (up to the interpreter's switch interval) while the main thread launches GPU work.
   One job at a time; the caller keeps every pointer alive until wait returns. */
#include <pthread.h>
#include <stdio.h>
#include <time.h>

typedef struct {
    const hqq_matrix *gate, *up, *down;
    int n;
    const float *x;
    int chunk, prefetch;
    int8_t *xq;
    float *xd, *xsum, *g, *u;
    int8_t *hq;
    float *hd, *hsum, *y;
    int threads;
    int32_t *flag; /* NULL, or set to seq once y is written (a GPU stream may wait on it: cuStreamWaitValue32) */
    int32_t seq;
} experts_job;

static pthread_mutex_t job_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t job_cond = PTHREAD_COND_INITIALIZER;
static experts_job job;
static int job_state; /* 0 idle, 1 queued, 2 running, 3 done */
static int job_worker_started;
static double job_ms;

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

static void *job_worker(void *unused) {
    (void)unused;
    pthread_mutex_lock(&job_mutex);
    for (;;) {
        while (job_state != 1) pthread_cond_wait(&job_cond, &job_mutex);
        experts_job j = job;
        job_state = 2;
        pthread_mutex_unlock(&job_mutex);
        double start = now_ms();
        hqq_experts_2bit_g16(j.gate, j.up, j.down, j.n, j.x, j.chunk, j.prefetch, j.xq, j.xd, j.xsum, j.g, j.u, j.hq,
                             j.hd, j.hsum, j.y, j.threads);
        double ms = now_ms() - start;
        if (j.flag) __atomic_store_n(j.flag, j.seq, __ATOMIC_RELEASE); /* after y: x86 keeps the stores in order */
        pthread_mutex_lock(&job_mutex);
        job_ms = ms;
        job_state = 3;
        pthread_cond_broadcast(&job_cond);
    }
    return NULL;
}

/* 0: started; -1: a job is still pending (wait for it first); -2: no worker thread could be started. flag: see
   experts_job. */
int hqq_experts_submit(const hqq_matrix *gate, const hqq_matrix *up, const hqq_matrix *down, int n, const float *x,
                       int chunk, int prefetch, int8_t *xq, float *xd, float *xsum, float *g, float *u, int8_t *hq,
                       float *hd, float *hsum, float *y, int threads, int32_t *flag, int32_t seq) {
    pthread_mutex_lock(&job_mutex);
    if (job_state == 1 || job_state == 2) {
        pthread_mutex_unlock(&job_mutex);
        return -1;
    }
    if (!job_worker_started) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, job_worker, NULL) != 0) {
            pthread_mutex_unlock(&job_mutex);
            return -2;
        }
        pthread_detach(thread);
        job_worker_started = 1;
    }
    experts_job j = {gate, up, down, n, x, chunk, prefetch, xq, xd, xsum, g, u, hq, hd, hsum, y, threads, flag, seq};
    job = j;
    job_state = 1;
    pthread_cond_broadcast(&job_cond);
    pthread_mutex_unlock(&job_mutex);
    return 0;
}

/* Blocks until the submitted job is done; its time in ms (-1 when nothing was submitted). */
double hqq_experts_wait(void) {
    pthread_mutex_lock(&job_mutex);
    while (job_state == 1 || job_state == 2) pthread_cond_wait(&job_cond, &job_mutex);
    double ms = job_state == 3 ? job_ms : -1.0;
    job_state = 0;
    pthread_mutex_unlock(&job_mutex);
    return ms;
}

/* CPU layers served without the host (offload/served.py): a thread of this library serves every CPU layer of a decode
   step as the GPU reaches it, with no Python in between. Per CPU layer l, the GPU writes the layer's input x and its
   routing (top_k experts, then a guess of the next CPU layer's first expert or -1) into pinned memory, then sets go[l] = 1
   (cuStreamWriteValue32). This thread then
     1. picks the GPU's share (gpu_k = top_k - cpu_k ranks: an expert already copied ahead on a guess first, then the
        highest-weighted ranks) and writes the plan [gpu ranks..., cpu ranks...];
     2. copies the GPU's share into its scratch slots (a DMA copy on its own CUDA stream) and sets copied[l] = 1 behind
        them on that stream, for the GPU to wait on;
     3. copies its guess for the next CPU layer into that layer's first scratch slot, on the same stream;
     4. computes the CPU's share (hqq_experts_2bit_g16) into y[l] and sets done[l] = 1.
   The GPU waits for copied[l], computes its share from the slots, waits for done[l], then takes plan and y up in one
   copy. CPU layers alternate between two sets of scratch slots (parity): the guess for layer next[l] goes into the set
   whose last reader (the CPU layer before l) finished before go[l] was set. (With one set, every parity 0 and no
   guesses: each layer's copies wait only for the layer before it, done before go[l].) cpu_k 0: the thread only
   copies, for experts of any format (the layers then stream their experts, with no host sync). Without CUDA (tests) the copies are
   memcpy on this thread and copied[l] is set directly. */
typedef int (*cu_ctx_set_fn)(void *ctx);
typedef int (*cu_copy_fn)(uint64_t dst, const void *src, size_t bytes, void *stream);  /* cuMemcpyHtoDAsync_v2 */
typedef int (*cu_write_fn)(void *stream, uint64_t addr, uint32_t value, unsigned flags); /* cuStreamWriteValue32_v2 */

enum { SERVER_COPIES, SERVER_GUESSES, SERVER_GUESS_HITS, SERVER_ERRORS, SERVER_COUNTERS };
#define SERVER_MAX_TOP_K 64

typedef struct {
    int layers, experts, top_k, cpu_k, threads, chunk, prefetch, guess, hidden;
    const hqq_matrix *gate, *up, *down; /* [layers * experts]; unused (may be NULL) where cpu_k is 0 */
    const uint8_t *const *src;          /* [layers * experts] each expert's host buffer of `bytes` */
    const uint64_t *slot;               /* [2 * gpu_k] scratch slot addresses (device; host memory without CUDA) */
    uint64_t bytes;
    const int32_t *parity, *next;       /* [layers]: scratch slot set; next CPU layer in the step, or -1 */
    int32_t *go, *copied, *done;        /* [layers] flags in pinned memory */
    const float *mail;                  /* [layers, D + top_k + 1]: x (float32 [D]), then the routing (int32 [top_k + 1]) */
    int32_t *plan_y;                    /* [layers, top_k + cpu_k * D]: plan (int32), then y (float32 [cpu_k, D]) */
    int32_t *staged;                    /* [layers] expert copied ahead into the layer's first slot, or -1 */
    int8_t *xq;                         /* work: see hqq_experts_2bit_g16 */
    float *xd, *xsum, *g, *u;
    int8_t *hq;
    float *hd, *hsum;
    void *ctx, *stream;
    cu_ctx_set_fn ctx_set;
    cu_copy_fn copy;
    cu_write_fn write;
    int64_t *served;                    /* [layers] */
    double *ms;                         /* [layers] */
    int64_t *counters;                  /* [SERVER_COUNTERS] */
    int32_t stop;
    int32_t debug;                      /* > 0: report the flags on stderr every `debug` s of idling (a stalled step) */
    uint64_t thread;
} layer_server;

static void server_copy(layer_server *s, uint64_t dst, const uint8_t *src) {
    if (s->copy) {
        if (s->copy(dst, src, (size_t)s->bytes, s->stream) != 0) s->counters[SERVER_ERRORS]++;
    } else {
        memcpy((void *)(uintptr_t)dst, src, (size_t)s->bytes);
    }
    s->counters[SERVER_COPIES]++;
}

static void serve_layer(layer_server *s, int l) {
    const double start = now_ms();
    const int K = s->top_k, C = s->cpu_k, G = K - C, E = s->experts, D = s->hidden;
    const float *x = s->mail + (size_t)l * (D + K + 1);
    const int32_t *r = (const int32_t *)(x + D);
    int32_t *plan = s->plan_y + (size_t)l * (K + C * D);
    float *y = (float *)(plan + K);
    /* (the GPU cleared copied[l] and done[l] before it set go[l]) */
    int taken[SERVER_MAX_TOP_K] = {0}, n = 0, ahead = 0;
    const int staged = s->staged[l];
    s->staged[l] = -1;
    for (int k = 0; G > 0 && staged >= 0 && k < K; k++)
        if (r[k] == staged) { plan[n++] = k; taken[k] = 1; ahead = 1; s->counters[SERVER_GUESS_HITS]++; break; }
    for (int k = 0; k < K && n < G; k++) /* the heaviest ranks: the CPU's int8 rounding then weighs least */
        if (!taken[k]) { plan[n++] = k; taken[k] = 1; }
    for (int k = 0; k < K; k++)
        if (!taken[k]) plan[n++] = k;
    const uint64_t *slots = s->slot + (size_t)s->parity[l] * G;
    for (int j = ahead; j < G; j++) server_copy(s, slots[j], s->src[(size_t)l * E + r[plan[j]]]);
    if (G > 0) {
        if (s->write) {
            if (s->write(s->stream, (uint64_t)(uintptr_t)&s->copied[l], 1, 0) != 0) s->counters[SERVER_ERRORS]++;
        } else {
            __atomic_store_n(&s->copied[l], 1, __ATOMIC_RELEASE);
        }
    }
    const int nl = s->next[l], guess = r[K];
    if (s->guess && G > 0 && nl >= 0 && guess >= 0 && guess < E) {
        server_copy(s, s->slot[(size_t)s->parity[nl] * G], s->src[(size_t)nl * E + guess]);
        s->staged[nl] = guess;
        s->counters[SERVER_GUESSES]++;
    }
    if (C > 0) {
        hqq_matrix gate[SERVER_MAX_TOP_K], up[SERVER_MAX_TOP_K], down[SERVER_MAX_TOP_K];
        for (int c = 0; c < C; c++) {
            const size_t e = (size_t)l * E + r[plan[G + c]];
            gate[c] = s->gate[e]; up[c] = s->up[e]; down[c] = s->down[e];
        }
        hqq_experts_2bit_g16(gate, up, down, C, x, s->chunk, s->prefetch, s->xq, s->xd, s->xsum,
                             s->g, s->u, s->hq, s->hd, s->hsum, y, s->threads);
    }
    __atomic_store_n(&s->done[l], 1, __ATOMIC_RELEASE); /* after plan and y: x86 keeps the stores in order */
    s->served[l]++;
    s->ms[l] += now_ms() - start;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* One stderr line with every layer's go/copied/done flags and the counters: where a stalled step waits (the GPU for
   copied[l]: the server's stream did not write it; for go[l]: the GPU never got there). */
static void server_report(const layer_server *s, double idle_ms) {
    char go[65], copied[65], done[65];
    const int n = s->layers < 64 ? s->layers : 64;
    for (int l = 0; l < n; l++) {
        go[l] = (char)('0' + (__atomic_load_n(&s->go[l], __ATOMIC_ACQUIRE) & 7));
        copied[l] = (char)('0' + (__atomic_load_n(&s->copied[l], __ATOMIC_ACQUIRE) & 7));
        done[l] = (char)('0' + (__atomic_load_n(&s->done[l], __ATOMIC_ACQUIRE) & 7));
    }
    go[n] = copied[n] = done[n] = 0;
    fprintf(stderr, "moe-offload layer server: idle %.0f s; go %s copied %s done %s; served[0] %lld copies %lld "
            "errors %lld\n", idle_ms / 1000.0, go, copied, done, (long long)s->served[0],
            (long long)s->counters[SERVER_COPIES], (long long)s->counters[SERVER_ERRORS]);
}

/* Spin on the go flags while decode is running (a flag seen a microsecond late costs a microsecond); once idle for
   SERVER_SPIN_MS, nap between scans (longer after a second), so an idle engine costs no core. */
#define SERVER_SPIN_MS 20.0
static void *server_loop(void *arg) {
    layer_server *s = arg;
    if (s->ctx_set && s->ctx_set(s->ctx) != 0) s->counters[SERVER_ERRORS]++;
    const double every = 1000.0 * s->debug;
    double idle_since = now_ms(), report_at = every;
    while (!__atomic_load_n(&s->stop, __ATOMIC_ACQUIRE)) {
        int any = 0;
        for (int l = 0; l < s->layers; l++) {
            if (__atomic_load_n(&s->go[l], __ATOMIC_ACQUIRE) == 1) {
                __atomic_store_n(&s->go[l], 0, __ATOMIC_RELAXED);
                serve_layer(s, l);
                any = 1;
            }
        }
        if (any) {
            idle_since = now_ms();
            report_at = every;
        } else {
            const double idle = now_ms() - idle_since;
            if (s->debug > 0 && idle >= report_at) {
                server_report(s, idle);
                report_at += every;
            }
            if (idle < SERVER_SPIN_MS) {
                cpu_relax();
            } else { /* 50 us naps between decode calls; 1 ms once idle for a second (a chat waiting for input) */
                struct timespec nap = {0, idle < 1000.0 ? 50000 : 1000000};
                nanosleep(&nap, NULL);
            }
        }
    }
    return NULL;
}

/* 0: serving; -1: top_k or cpu_k out of range, or CPU experts without matrices; -2: no thread could be started. */
int hqq_server_start(layer_server *s) {
    if (s->top_k > SERVER_MAX_TOP_K || s->top_k < 1 || s->cpu_k < 0 || s->cpu_k > s->top_k) return -1;
    if (s->cpu_k > 0 && !(s->gate && s->up && s->down)) return -1;
    __atomic_store_n(&s->stop, 0, __ATOMIC_RELEASE);
    pthread_t thread;
    if (pthread_create(&thread, NULL, server_loop, s) != 0) return -2;
    s->thread = (uint64_t)thread;
    return 0;
}

void hqq_server_stop(layer_server *s) {
    __atomic_store_n(&s->stop, 1, __ATOMIC_RELEASE);
    pthread_join((pthread_t)s->thread, NULL);
}
