/* Batch-1 matrix-vector product over HQQ-packed weights, on the CPU, reading the packing in place.

   y[n] = sum_k x[k] * W[n, k],  W[n, k] = (q[n, k] - z[n, m]) * s[n, m],  m = k / G

   The layout is moe_offload.quant.pack's (int32 words, row-major [N, K*bits/32]) and hqq's metadata
   (float16 [N, M], or 8-bit codes [N, M] with float16 step/offset [N, M/B]). Nothing is converted at load
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
    int meta_q8; /* 0: float16 scale/zero [N, M]; 1: uint8 codes + float16 step/offset [N, M/B] */
    const uint16_t *scale, *zero;
    const uint8_t *scale_q, *zero_q;
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

static inline f32x16 gather_u8(const uint8_t *p, size_t stride, size_t col) {
    i32x16 v;
    for (int r = 0; r < R; r++) v[r] = p[(size_t)r * stride + col];
    return __builtin_convertvector(v, f32x16);
}

/* Scale and zero of rows n0 .. n0+15: float16 per group, or 8-bit codes with a float16 step and
   offset per block of groups (the block's step/offset are converted once, not per group). */
typedef struct { f32x16 s_step, s_offset, z_step, z_offset; size_t block; } meta_cache;

static inline void load_meta(const hqq_matrix *w, int n0, size_t m, f32x16 *s, f32x16 *z, meta_cache *mc) {
    const size_t M = w->k / w->group;
    if (!w->meta_q8) {
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
    *s = gather_u8(w->scale_q + n0 * M, M, m) * mc->s_step + mc->s_offset;
    *z = gather_u8(w->zero_q + n0 * M, M, m) * mc->z_step + mc->z_offset;
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
