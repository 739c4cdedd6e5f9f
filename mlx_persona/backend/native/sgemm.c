/* The cblas_sgemm that MLX's CPU backend calls on Linux: matrix-vector products to sgemv, a few rows in
 * our kernel, and opt-in bfloat16 inputs.
 *
 * MLX sends every float32 matmul on the CPU to cblas_sgemm. Loaded with RTLD_GLOBAL before the BLAS
 * and before mlx.core, this library's cblas_sgemm is the one MLX binds to (mlx_persona/sgemm.py); it
 * forwards to the BLAS it was bound to (OpenBLAS, or oneMKL for bf16):
 *
 * - m == 1 or n == 1 (decoding one token: every linear layer and the LM head) goes to cblas_sgemv.
 *   OpenBLAS 0.3.21 (Debian 12) runs such an sgemm through its full GEMM path, packing the whole weight
 *   matrix: 10 GB/s against sgemv's 28 GB/s for Gemma's 262144 x 640 head. Same products, exact.
 * - A few rows times a weight matrix (2 <= m <= 32: batched decoding, short prompts, x W^T) goes to
 *   few_rows below. OpenBLAS packs the whole weight matrix for them too: 0.41 ms for 4 rows of a
 *   2048 x 640 layer against 0.05 ms here (2 cores, AVX-512); the same products, summed in another order.
 * - With bf16 on (MLX_PERSONA_MATMUL=bf16), large products have their inputs rounded to bfloat16 (round
 *   to nearest even) and go to a bf16 GEMM that accumulates and writes float32 (the numerics of PyTorch's
 *   bf16 autocast of a matmul): oneMKL's cblas_gemm_bf16bf16f32 (AMX tiles), or ours (bf16.c, AVX512-BF16).
 *   A pinned weight (pinned.c: a bf16 copy made once) is read from its copy, at any size; 1-48 rows against
 *   one (decoding, batched decoding, short prompts) go to bf16.c's rows kernel. Small or thin products without one (LoRA's rank-r matmuls) stay exact.
 *   Everything that is not a matmul is untouched and stays float32.
 *
 * MLX can call this from several stream threads at once: the conversion buffers are per thread.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

#include "mlxp.h"

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float, float *,
                         int);
typedef void (*bf16gemm_fn)(int, int, int, int, int, int, float, const uint16_t *, int,
                            const uint16_t *, int, float, float *, int);

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
/* Up to this many rows against a pinned weight, bf16.c's rows kernel beats its packed GEMM (which packs the
   whole weight for each call): 290-360 GFLOP/s against 130-300 at 16-48 rows of 640 x 2048 (2 cores). */
enum { ROWS_MAX = 48 };
/* Up to this many rows, few_rows beats OpenBLAS 0.3.21's sgemm (which packs the whole weight each call): at
   16 rows Gemma's 262144 x 640 LM head 42-54 ms against 63, at 12 rows 37-47 against 111 (2-core AMD EPYC). */
enum { FEW_MAX = 32 };

static sgemm_fn exact_sgemm;
static sgemv_fn exact_sgemv;
static bf16gemm_fn bf16_gemm;
static void (*blas_threads)(int); /* OpenBLAS's openblas_set_num_threads, where the BLAS is OpenBLAS */
static int enabled; /* bf16 inputs */
static int own;     /* ... through bf16.c's kernel, not oneMKL's */
static int few_rows_on = 1; /* MLX_PERSONA_FEW_ROWS=0 turns few_rows off (benchmarks, bisecting) */
static double min_work = 4194304.0; /* m*n*k below this: exact */
static int min_dim = 32;            /* any of m, n, k below this: exact */
static long counts[6]; /* calls: exact sgemm, bf16, sgemv, few rows, bf16 rows, with a pinned copy; racy, for tests
                          and doctor only */

/* Binds to the BLAS at `path` (loaded locally here; mlx_persona/sgemm.py then makes this library and
   then the BLAS global, in that order). Returns 0, or 1 if it cannot be loaded, 2 if it has no
   cblas_sgemm or cblas_sgemv. oneMKL also gives the bf16 gemm; mlxp_has_bf16 says whether it did. */
int mlxp_bind(const char *path) {
  void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!h) return 1;
  exact_sgemm = (sgemm_fn)dlsym(h, "cblas_sgemm");
  exact_sgemv = (sgemv_fn)dlsym(h, "cblas_sgemv");
  bf16_gemm = (bf16gemm_fn)dlsym(h, "cblas_gemm_bf16bf16f32");
  blas_threads = (void (*)(int))dlsym(h, "openblas_set_num_threads");
  return (exact_sgemm && exact_sgemv) ? 0 : 2;
}

int mlxp_has_bf16(void) { return bf16_gemm != 0; }

/* bf16: inputs rounded to bf16 for large products; with_own: by our kernel (bf16.c) rather than oneMKL's. */
void mlxp_configure(int bf16, int with_own, double work, int dim) {
  const char *few = getenv("MLX_PERSONA_FEW_ROWS");
  few_rows_on = !(few && few[0] == '0' && few[1] == 0);
  own = with_own && mlxp_bf16_kernel();
  enabled = bf16 && (own || bf16_gemm);
  /* With our kernel every large product is ours (on pool.c's threads); what OpenBLAS keeps is small (sgemv
     of attention, LoRA's thin products). Its threads spin for a while after each call, on the cores our
     workers need next: one thread for it (decoding the gemma-3-270m shape: 39 -> 26 ms a token). */
  if (enabled && own && blas_threads) blas_threads(1);
  min_work = work;
  min_dim = dim;
}

long mlxp_count(int which) { return which >= 0 && which < 6 ? counts[which] : -1; }

/* `outer` runs of `inner` floats, `ld` apart, into a packed bf16 matrix. */
static void convert(const float *src, int outer, int inner, int ld, uint16_t *dst) {
  long n = (long)outer * inner;
  if (ld == inner) {
    long blocks = (n + 65535) / 65536;
#pragma omp parallel for if (n > (1L << 18)) schedule(static)
    for (long b = 0; b < blocks; ++b) {
      long lo = b * 65536, hi = lo + 65536 < n ? lo + 65536 : n;
      mlxp_convert_bf16(src + lo, dst + lo, hi - lo);
    }
    return;
  }
#pragma omp parallel for if (n > (1L << 18)) schedule(static)
  for (int o = 0; o < outer; ++o) mlxp_convert_bf16(src + (long)o * ld, dst + (long)o * inner, inner);
}

/* Few rows: C (m x n) = alpha A (m x k) B^T (B: n x k, row-major) + beta C, for small m. Each thread
   takes 4 rows of B at a time and multiplies them with 4 rows of A at a time (16 accumulators of 16
   floats), so every weight is read from memory once for all m rows; B's 4 rows stay in L1 across the
   groups of A's rows. The vector type is GCC's: AVX-512 where -march has it, two AVX2 or four SSE
   registers elsewhere, NEON on Arm. */
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4))); /* the same, unaligned loads */

static inline v16 load16(const float *p) { return *(const v16u *)p; }

struct few_job {
  int m, n, k, lda, ldb, ldc;
  float alpha, beta;
  const float *a, *b;
  float *c;
};

/* Columns [j_begin, j_end) of C (j_begin a multiple of 4). */
static void few_rows_part(const struct few_job *q, int j_begin, int j_end) {
  int m = q->m, n = j_end, k = q->k, lda = q->lda, ldb = q->ldb, ldc = q->ldc;
  float alpha = q->alpha, beta = q->beta;
  const float *a = q->a, *b = q->b;
  float *c = q->c;
  int k16 = k & ~15;
  for (int j0 = j_begin; j0 < n; j0 += 4) {
    int jn = n - j0 < 4 ? n - j0 : 4;
    const float *bj[4];
    for (int t = 0; t < 4; t++) bj[t] = b + (long)(j0 + (t < jn ? t : 0)) * ldb;
    /* The first group of A's rows also fetches the weight rows PREFETCH_ROWS ahead into the cache: the
       hardware's prefetcher misses the start of each short weight row, and the loads then wait on memory
       (bf16.c has the same, with figures). */
    const float *next = j0 + PREFETCH_ROWS + 4 <= n ? b + (long)(j0 + PREFETCH_ROWS) * ldb : 0;
    for (int i0 = 0; i0 < m; i0 += 4) {
      int in = m - i0 < 4 ? m - i0 : 4;
      const float *ai[4], *pf = i0 == 0 ? next : 0;
      for (int r = 0; r < 4; r++) ai[r] = a + (long)(i0 + (r < in ? r : 0)) * lda;
      v16 acc[4][4];
      memset(acc, 0, sizeof acc);
      for (int p = 0; p < k16; p += 16) {
        v16 x0 = load16(ai[0] + p), x1 = load16(ai[1] + p), x2 = load16(ai[2] + p), x3 = load16(ai[3] + p);
        v16 w[4] = {load16(bj[0] + p), load16(bj[1] + p), load16(bj[2] + p), load16(bj[3] + p)};
        if (pf)
          for (int t = 0; t < 4; t++) __builtin_prefetch(pf + (long)t * ldb + p);
        /* In registers, each loaded once: GCC otherwise folds a load into every FMA (32 loads for 16 FMAs,
           which made the loop load-bound: 54 -> 40 ms for 8 rows of Gemma's LM head). */
        PIN(x0); PIN(x1); PIN(x2); PIN(x3); PIN(w[0]); PIN(w[1]); PIN(w[2]); PIN(w[3]);
        for (int t = 0; t < 4; t++) {
          acc[0][t] += x0 * w[t];
          acc[1][t] += x1 * w[t];
          acc[2][t] += x2 * w[t];
          acc[3][t] += x3 * w[t];
        }
      }
      float sums[16];
#ifdef __AVX512F__
      mlxp_sum_tile((const __m512(*)[4])acc, sums);
#else
      for (int r = 0; r < 16; r++) {
        sums[r] = 0.0f;
        for (int l = 0; l < 16; l++) sums[r] += acc[r / 4][r % 4][l];
      }
#endif
      for (int r = 0; r < in; r++)
        for (int t = 0; t < jn; t++) {
          float s = sums[r * 4 + t];
          for (int p = k16; p < k; p++) s += ai[r][p] * bj[t][p];
          float *out = c + (long)(i0 + r) * ldc + j0 + t;
          *out = beta == 0.0f ? alpha * s : alpha * s + beta * *out; /* beta 0: C is not read (BLAS) */
        }
    }
  }
}

static void few_rows_job(void *ctx, int part, int parts) {
  const struct few_job *q = ctx;
  int begin, end;
  pool_range(part, parts, q->n, 4, &begin, &end);
  if (begin < end) few_rows_part(q, begin, end);
}

static void few_rows(int m, int n, int k, float alpha, const float *a, int lda, const float *b, int ldb,
                     float beta, float *c, int ldc) {
  struct few_job q = {m, n, k, lda, ldb, ldc, alpha, beta, a, b, c};
  pool_run(few_rows_job, &q, (double)n * k * m < 262144.0 ? 1 : (n + 3) / 4);
}

/* Only where the 4 x 4 tile of 16-float accumulators fits the registers (AVX-512: 32 of them); built
   without it the tile spills to the stack on every FMA, and OpenBLAS is left the product. */
static int few_rows_fit(int order, int ta, int tb, int m, int n, int k) {
#ifndef __AVX512F__
  (void)order, (void)ta, (void)tb, (void)m, (void)n, (void)k;
  return 0;
#endif
  return order == ROW_MAJOR && ta == NO_TRANS && tb == TRANS && m >= 2 && m <= FEW_MAX && k >= 16 && n >= 4;
}

static __thread uint16_t *scratch;
static __thread size_t scratch_len;

/* bf16 inputs, a16/b16 the pinned copies or 0: our kernel, or oneMKL's after rounding what is not pinned.
   0 when done; -1 when out of memory for the copies (nothing written). */
static int bf16_product(int ta, int tb, int m, int n, int k, float alpha, const float *a, const uint16_t *a16,
                        int lda, const float *b, const uint16_t *b16, int ldb, float beta, float *c, int ldc) {
  if (own) return mlxp_bf16_gemm(ta, tb, m, n, k, alpha, a, a16, lda, b, b16, ldb, beta, c, ldc);
  int a_rows = ta == NO_TRANS ? m : k, a_cols = ta == NO_TRANS ? k : m; /* as stored, row-major */
  int b_rows = tb == NO_TRANS ? k : n, b_cols = tb == NO_TRANS ? n : k;
  size_t need = (a16 ? 0 : (size_t)a_rows * a_cols) + (b16 ? 0 : (size_t)b_rows * b_cols);
  if (need > scratch_len) {
    uint16_t *grown = (uint16_t *)realloc(scratch, need * sizeof(uint16_t));
    if (!grown) return -1;
    scratch = grown;
    scratch_len = need;
  }
  int a_ld = lda, b_ld = ldb;
  if (!a16) {
    convert(a, a_rows, a_cols, lda, scratch);
    a16 = scratch, a_ld = a_cols;
  }
  if (!b16) {
    uint16_t *to = scratch + (a16 == scratch ? (size_t)a_rows * a_cols : 0);
    convert(b, b_rows, b_cols, ldb, to);
    b16 = to, b_ld = b_cols;
  }
  bf16_gemm(ROW_MAJOR, ta, tb, m, n, k, alpha, a16, a_ld, b16, b_ld, beta, c, ldc);
  return 0;
}

static void sgemv_product(int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                          const float *b, int ldb, float beta, float *c, int ldc) {
  if (m == 1) { /* c (1 x n) = a (1 x k) op(B): c^T = op(B)^T a^T */
    int incx = ta == NO_TRANS ? 1 : lda;
    if (tb == NO_TRANS) /* B is k x n */
      exact_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, incx, beta, c, 1);
    else /* B is n x k */
      exact_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, incx, beta, c, 1);
  } else { /* c (m x 1, ldc apart) = op(A) b (k x 1) */
    int incx = tb == NO_TRANS ? ldb : 1;
    if (ta == NO_TRANS) /* A is m x k */
      exact_sgemv(ROW_MAJOR, NO_TRANS, m, k, alpha, a, lda, b, incx, beta, c, ldc);
    else /* A is k x m */
      exact_sgemv(ROW_MAJOR, TRANS, k, m, alpha, a, lda, b, incx, beta, c, ldc);
  }
}

/* Row-major. A pinned operand (a16/b16) means bf16 at any size: a few rows against a pinned weight in our
   rows kernel, anything else as a bf16 product. */
static void product(int ta, int tb, int m, int n, int k, float alpha, const float *a, const uint16_t *a16,
                    int lda, const float *b, const uint16_t *b16, int ldb, float beta, float *c, int ldc) {
  if (k > 0 && (a16 || b16)) {
    counts[5]++;
    if (own && b16 && !a16 && ta == NO_TRANS && tb == TRANS && m <= ROWS_MAX) {
      counts[4]++;
      if (mlxp_bf16_rows(m, n, k, alpha, a, lda, b16, ldb, beta, c, ldc) == 0) return;
    } else if (bf16_product(ta, tb, m, n, k, alpha, a, a16, lda, b, b16, ldb, beta, c, ldc) == 0) {
      counts[1]++;
      return;
    }
  }
  if ((m == 1 || n == 1) && k > 0) {
    counts[2]++;
    sgemv_product(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  if (few_rows_fit(ROW_MAJOR, ta, tb, m, n, k) && few_rows_on) {
    counts[3]++;
    few_rows(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  if (enabled && (double)m * n * k >= min_work && m >= min_dim && n >= min_dim && k >= min_dim &&
      bf16_product(ta, tb, m, n, k, alpha, a, 0, lda, b, 0, ldb, beta, c, ldc) == 0) {
    counts[1]++;
    return;
  }
  counts[0]++; /* exact; also a bf16 product out of memory for its copies */
  exact_sgemm(ROW_MAJOR, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
  if (order != ROW_MAJOR) { /* column-major C is row-major C^T = op(B)^T op(A)^T */
    cblas_sgemm(ROW_MAJOR, tb, ta, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
    return;
  }
  int held = enabled ? mlxp_pins_hold() : 0;
  const uint16_t *a16 = held ? mlxp_pinned_view(a, ta, m, k, lda) : 0;
  const uint16_t *b16 = held ? mlxp_pinned_view(b, tb, k, n, ldb) : 0;
  product(ta, tb, m, n, k, alpha, a, a16, lda, b, b16, ldb, beta, c, ldc);
  mlxp_pins_release(held);
}
