/* Products on bfloat16 inputs with AVX512-BF16's VDPBF16PS (float32 accumulation and output), for CPUs that
 * have it without AMX (AMD Zen 4 and later, Intel Cooper Lake): oneMKL's cblas_gemm_bf16bf16f32 runs at
 * ~160 GFLOP/s on a 2-core Zen 4 where PyTorch's oneDNN reaches 810-850 and this kernel 320-630 (inside
 * MLX; 560-800 in a C harness); OpenBLAS as Debian and PyPI build it has no sbgemm.
 *
 * - mlxp_bf16_gemm: packed GEMM. A (all of it) and then each 32-column strip of B are packed as pairs of
 *   bf16 along the depth, the layout VDPBF16PS multiplies: a 12 x 32 tile of C is 24 accumulators, each
 *   step one broadcast pair of A per row against 2 x 16 pairs of B. Depth in blocks of KC (B's strip stays
 *   in L1). Threads take strips of columns.
 * - mlxp_bf16_rows: a few rows (decoding, short prompts) times a weight matrix already in bf16: dot products along the
 *   depth, 4 weight rows at a time against up to 4 rows of A, so each weight is read from memory once.
 *
 * Rounding to bf16: round to nearest even (the instruction's; denormal inputs count as zero).
 */
#include <stdlib.h>
#include <string.h>

#include "mlxp.h"

#ifndef __AVX512BF16__
int mlxp_bf16_kernel(void) { return 0; }
int mlxp_bf16_gemm(int ta, int tb, int m, int n, int k, float alpha, const float *a, const uint16_t *a16,
                    int lda, const float *b, const uint16_t *b16, int ldb, float beta, float *c, int ldc) {
  (void)ta, (void)tb, (void)m, (void)n, (void)k, (void)alpha, (void)a, (void)a16, (void)lda, (void)b;
  (void)b16, (void)ldb, (void)beta, (void)c, (void)ldc;
  return -1; /* never called: mlxp_bf16_kernel() is 0 */
}
int mlxp_bf16_rows(int m, int n, int k, float alpha, const float *a, int lda, const uint16_t *w, int ldw,
                    float beta, float *c, int ldc) {
  (void)m, (void)n, (void)k, (void)alpha, (void)a, (void)lda, (void)w, (void)ldw, (void)beta, (void)c, (void)ldc;
  return -1;
}
#else
#include <immintrin.h>

int mlxp_bf16_kernel(void) { return 1; }

enum { MR = 12, NR = 32, KC = 384 }; /* KC even */

/* An operand as rows x depth: element (r, p) at f[r * sr + p * sp] (float32) or h[...] (bf16, when h). */
struct view {
  const float *f;
  const uint16_t *h;
  long sr, sp;
};

static inline uint32_t half(const struct view *v, long r, long p) {
  long at = r * v->sr + p * v->sp;
  return v->h ? v->h[at] : mlxp_to_bf16(v->f[at]);
}

/* out[q * W + t] = the bf16 pair (depth p0 + 2q, p0 + 2q + 1) of row r0 + t; zeros past `valid` rows and
   past the depth kc. */
static void pack(const struct view *v, long r0, int valid, int W, long p0, int kc, uint32_t *out) {
  int kq = (kc + 1) / 2, even = kc & ~1;
  if (v->sp == 1) { /* rows contiguous along the depth: 16 pairs at a time, scattered W apart */
    __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                     _mm512_set1_epi32(W));
    for (int t = 0; t < valid; t++) {
      long at = (r0 + t) * v->sr + p0;
      int q = 0;
      for (; 2 * q + 32 <= even; q += 16) {
        __m512i pairs = v->h ? _mm512_loadu_si512((const void *)(v->h + at + 2 * q))
                             : (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(v->f + at + 2 * q + 16),
                                                            _mm512_loadu_ps(v->f + at + 2 * q));
        _mm512_i32scatter_epi32(out + (long)q * W + t, idx, pairs, 4);
      }
      for (; q < kq; q++)
        out[(long)q * W + t] = half(v, r0 + t, p0 + 2 * q) | (2 * q + 1 < kc ? half(v, r0 + t, p0 + 2 * q + 1) << 16 : 0);
    }
  } else if (v->sr == 1) { /* contiguous along the rows: two depths' rows interleaved, 16 rows at a time */
    for (int q = 0; q < kq; q++) {
      long lo_at = (p0 + 2 * q) * v->sp + r0, hi_at = lo_at + v->sp;
      int has_hi = 2 * q + 1 < kc;
      for (int t = 0; t < valid; t += 16) {
        __mmask16 mask = valid - t >= 16 ? 0xffff : (__mmask16)((1u << (valid - t)) - 1);
        __m512i lo, hi = _mm512_setzero_si512();
        if (v->h) {
          lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, v->h + lo_at + t));
          if (has_hi) hi = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, v->h + hi_at + t));
        } else {
          lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, v->f + lo_at + t)));
          if (has_hi)
            hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, v->f + hi_at + t)));
        }
        _mm512_mask_storeu_epi32(out + (long)q * W + t, mask, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
  } else {
    for (int q = 0; q < kq; q++)
      for (int t = 0; t < valid; t++)
        out[(long)q * W + t] = half(v, r0 + t, p0 + 2 * q) | (2 * q + 1 < kc ? half(v, r0 + t, p0 + 2 * q + 1) << 16 : 0);
  }
  if (valid < W)
    for (int q = 0; q < kq; q++) memset(out + (long)q * W + valid, 0, (size_t)(W - valid) * 4);
}

/* C tile (rows x cols of MR x NR) = alpha A B + (first ? beta C : C), A and B packed, kq pairs deep. */
static void kernel(int kq, const uint32_t *ap, const uint32_t *bp, float *c, long ldc, int rows, int cols,
                   float alpha, float beta, int first) {
  __m512 acc[MR][2];
#pragma GCC unroll 12
  for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int q = 0; q < kq; q++) {
    __m512bh b0 = (__m512bh)_mm512_loadu_si512((const void *)(bp + q * NR));
    __m512bh b1 = (__m512bh)_mm512_loadu_si512((const void *)(bp + q * NR + 16));
#pragma GCC unroll 12
    for (int r = 0; r < MR; r++) {
      __m512bh x = (__m512bh)_mm512_set1_epi32((int)ap[q * MR + r]);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, b1);
    }
  }
  __mmask16 m0 = cols >= 16 ? 0xffff : (__mmask16)((1u << cols) - 1);
  __mmask16 m1 = cols >= 32 ? 0xffff : cols > 16 ? (__mmask16)((1u << (cols - 16)) - 1) : 0;
  __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(first ? beta : 1.0f);
  int read = !first || beta != 0.0f; /* beta 0: C is not read (BLAS) */
#pragma GCC unroll 12
  for (int r = 0; r < MR; r++) {
    if (r >= rows) break;
    float *out = c + r * ldc;
    __m512 v0 = _mm512_mul_ps(va, acc[r][0]), v1 = _mm512_mul_ps(va, acc[r][1]);
    if (read) {
      v0 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m0, out), v0);
      v1 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m1, out + 16), v1);
    }
    _mm512_mask_storeu_ps(out, m0, v0);
    _mm512_mask_storeu_ps(out + 16, m1, v1);
  }
}

struct gemm_job {
  int m, n, k, mblocks;
  float alpha, beta;
  struct view a, b;
  uint32_t *apack;
  float *c;
  long ldc;
};

static long a_block(const struct gemm_job *g, int kb) { return (long)kb * g->mblocks * (KC / 2) * MR; }

static void pack_a_part(void *ctx, int part, int parts) {
  struct gemm_job *g = ctx;
  int begin, end;
  pool_range(part, parts, g->mblocks, 1, &begin, &end);
  for (int kb = 0; kb * KC < g->k; kb++) {
    int kc = g->k - kb * KC < KC ? g->k - kb * KC : KC, kq = (kc + 1) / 2;
    for (int ib = begin; ib < end; ib++) {
      int rows = g->m - ib * MR < MR ? g->m - ib * MR : MR;
      pack(&g->a, (long)ib * MR, rows, MR, (long)kb * KC, kc, g->apack + a_block(g, kb) + (long)ib * kq * MR);
    }
  }
}

static void gemm_part(void *ctx, int part, int parts) {
  struct gemm_job *g = ctx;
  uint32_t bp[KC / 2 * NR] __attribute__((aligned(64)));
  int begin, end;
  pool_range(part, parts, g->n, NR, &begin, &end);
  for (int j = begin; j < end; j += NR) {
    int cols = g->n - j < NR ? g->n - j : NR;
    for (int kb = 0; kb * KC < g->k; kb++) {
      int kc = g->k - kb * KC < KC ? g->k - kb * KC : KC, kq = (kc + 1) / 2;
      pack(&g->b, j, cols, NR, (long)kb * KC, kc, bp);
      for (int ib = 0; ib < g->mblocks; ib++) {
        int rows = g->m - ib * MR < MR ? g->m - ib * MR : MR;
        kernel(kq, g->apack + a_block(g, kb) + (long)ib * kq * MR, bp, g->c + (long)ib * MR * g->ldc + j,
               g->ldc, rows, cols, g->alpha, g->beta, kb == 0);
      }
    }
  }
}

static __thread uint32_t *apack_buf;
static __thread size_t apack_len;

enum { NO_TRANS = 111 };

int mlxp_bf16_gemm(int ta, int tb, int m, int n, int k, float alpha, const float *a, const uint16_t *a16,
                    int lda, const float *b, const uint16_t *b16, int ldb, float beta, float *c, int ldc) {
  struct gemm_job g = {m, n, k, (m + MR - 1) / MR, alpha, beta,
                       {a, a16, ta == NO_TRANS ? lda : 1, ta == NO_TRANS ? 1 : lda},
                       {b, b16, tb == NO_TRANS ? 1 : ldb, tb == NO_TRANS ? ldb : 1}, 0, c, ldc};
  size_t need = (size_t)a_block(&g, (k + KC - 1) / KC);
  if (need > apack_len) {
    free(apack_buf);
    apack_buf = (uint32_t *)aligned_alloc(64, (need * 4 + 63) & ~(size_t)63);
    apack_len = apack_buf ? need : 0;
    if (!apack_buf) return -1;
  }
  g.apack = apack_buf;
  int big = (double)m * n * k >= 262144.0;
  pool_run(pack_a_part, &g, big ? g.mblocks : 1);
  pool_run(gemm_part, &g, big ? (n + NR - 1) / NR : 1);
  return 0;
}

struct rows_job {
  int m, n, k, kp;
  float alpha, beta;
  const uint16_t *x, *w;
  long ldw;
  float *c;
  long ldc;
};

/* R rows of x (bf16, kp wide, zero-padded) against 4 weight rows: C[i0.., j0..j0+jn). */
static inline __attribute__((always_inline)) void rows_tile(const struct rows_job *q, int R, int i0, int j0, int jn,
                                                            const uint16_t *next) {
  const uint16_t *wt[4], *xr[4];
  for (int t = 0; t < 4; t++) wt[t] = q->w + (long)(j0 + (t < jn ? t : 0)) * q->ldw;
  for (int r = 0; r < R; r++) xr[r] = q->x + (long)(i0 + r) * q->kp;
  __m512 acc[4][4];
#pragma GCC unroll 4
  for (int r = 0; r < R; r++)
#pragma GCC unroll 4
    for (int t = 0; t < 4; t++) acc[r][t] = _mm512_setzero_ps();
  const int k = q->k, full = k & ~31;
  for (int p = 0; p < k; p += 32) {
    __mmask32 mask = p < full ? 0xffffffffu : (__mmask32)((1u << (k - p)) - 1);
    __m512bh w[4], x[4];
#pragma GCC unroll 4
    for (int t = 0; t < 4; t++) w[t] = (__m512bh)_mm512_maskz_loadu_epi16(mask, wt[t] + p);
    if (next)
#pragma GCC unroll 4
      for (int t = 0; t < 4; t++) _mm_prefetch((const char *)(next + t * q->ldw + p), _MM_HINT_T0);
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) x[r] = (__m512bh)_mm512_loadu_si512((const void *)(xr[r] + p));
#pragma GCC unroll 4
    for (int t = 0; t < 4; t++) PIN(w[t]); /* each loaded once, not once per row (see PIN) */
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) PIN(x[r]);
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
      for (int t = 0; t < 4; t++) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], x[r], w[t]);
  }
  float sums[16];
  if (R == 1) {
#pragma GCC unroll 4
    for (int t = 0; t < 4; t++) sums[t] = _mm512_reduce_add_ps(acc[0][t]);
  } else {
    for (int r = R; r < 4; r++)
      for (int t = 0; t < 4; t++) acc[r][t] = _mm512_setzero_ps();
    mlxp_sum_tile((const __m512(*)[4])acc, sums);
  }
  for (int r = 0; r < R; r++)
    for (int t = 0; t < jn; t++) {
      float s = q->alpha * sums[r * 4 + t];
      float *out = q->c + (long)(i0 + r) * q->ldc + j0 + t;
      *out = q->beta == 0.0f ? s : s + q->beta * *out;
    }
}

static void rows_part(void *ctx, int part, int parts) {
  const struct rows_job *q = ctx;
  int begin, end;
  pool_range(part, parts, q->n, 4, &begin, &end);
  for (int j0 = begin; j0 < end; j0 += 4) {
    int jn = end - j0 < 4 ? end - j0 : 4;
    /* The first group of rows also prefetches the weight rows PREFETCH_ROWS ahead: without it the loads of
       each short weight row wait on memory (16 rows of gemma-3-1b's LM head, 262,144 x 1152: 35-42 ms ->
       28-32 on the 2-core EPYC; its 6912 x 1152 MLP 1.0-1.15 -> 0.89-0.98 ms). */
    const uint16_t *next = j0 + PREFETCH_ROWS + 4 <= end ? q->w + (long)(j0 + PREFETCH_ROWS) * q->ldw : 0;
    for (int i0 = 0; i0 < q->m; i0 += 4) {
      const uint16_t *pf = i0 == 0 ? next : 0;
      switch (q->m - i0 < 4 ? q->m - i0 : 4) {
        case 1: rows_tile(q, 1, i0, j0, jn, pf); break;
        case 2: rows_tile(q, 2, i0, j0, jn, pf); break;
        case 3: rows_tile(q, 3, i0, j0, jn, pf); break;
        default: rows_tile(q, 4, i0, j0, jn, pf); break;
      }
    }
  }
}

static __thread uint16_t *x_buf;
static __thread size_t x_len;

int mlxp_bf16_rows(int m, int n, int k, float alpha, const float *a, int lda, const uint16_t *w, int ldw,
                    float beta, float *c, int ldc) {
  int kp = (k + 31) & ~31;
  size_t need = (size_t)m * kp;
  if (need > x_len) {
    free(x_buf);
    x_buf = (uint16_t *)malloc(need * 2);
    x_len = x_buf ? need : 0;
    if (!x_buf) return -1;
  }
  for (int i = 0; i < m; i++) {
    uint16_t *row = x_buf + (size_t)i * kp;
    int p = 0;
    for (; p + 16 <= k; p += 16)
      _mm256_storeu_si256((__m256i *)(row + p), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(a + (long)i * lda + p)));
    for (; p < k; p++) row[p] = mlxp_to_bf16(a[(long)i * lda + p]);
    for (; p < kp; p++) row[p] = 0;
  }
  struct rows_job q = {m, n, k, kp, alpha, beta, x_buf, w, ldw, c, ldc};
  pool_run(rows_part, &q, (double)n * k * m >= 262144.0 ? (n + 3) / 4 : 1);
  return 0;
}
#endif
