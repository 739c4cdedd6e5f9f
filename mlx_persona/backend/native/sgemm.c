/* The cblas_sgemm that MLX's CPU backend calls on Linux: matrix-vector products to sgemv, and opt-in
 * bfloat16 inputs for large products.
 *
 * MLX sends every float32 matmul on the CPU to cblas_sgemm. Loaded with RTLD_GLOBAL before the BLAS
 * and before mlx.core, this library's cblas_sgemm is the one MLX binds to (mlx_persona/sgemm.py); it
 * forwards to the BLAS it was bound to (OpenBLAS, or oneMKL for bf16):
 *
 * - m == 1 or n == 1 (decoding one token: every linear layer and the LM head) goes to cblas_sgemv.
 *   OpenBLAS 0.3.21 (Debian 12) runs such an sgemm through its full GEMM path, packing the whole weight
 *   matrix: 10 GB/s against sgemv's 28 GB/s for Gemma's 262144 x 640 head. Same products, exact.
 * - With bf16 on (MLX_PERSONA_MATMUL=bf16, oneMKL), large products have their inputs rounded to
 *   bfloat16 (round to nearest even) and go to oneMKL's cblas_gemm_bf16bf16f32, which runs on the
 *   CPU's AMX tiles (or AVX512-BF16) and accumulates and writes float32: the numerics of PyTorch's bf16
 *   autocast of a matmul, with a float32 result. Small or thin products (LoRA's rank-r matmuls) stay
 *   exact. Everything that is not a matmul is untouched and stays float32.
 *
 * MLX can call this from several stream threads at once: the conversion buffers are per thread.
 */
#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float, float *,
                         int);
typedef void (*bf16gemm_fn)(int, int, int, int, int, int, float, const uint16_t *, int,
                            const uint16_t *, int, float, float *, int);

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

static sgemm_fn exact_sgemm;
static sgemv_fn exact_sgemv;
static bf16gemm_fn bf16_gemm;
static int enabled; /* bf16 inputs */
static double min_work = 4194304.0; /* m*n*k below this: exact */
static int min_dim = 32;            /* any of m, n, k below this: exact */
static long counts[3]; /* [exact sgemm, bf16, sgemv] calls; racy, for tests and doctor only */

/* Binds to the BLAS at `path` (loaded locally here; mlx_persona/sgemm.py then makes this library and
   then the BLAS global, in that order). Returns 0, or 1 if it cannot be loaded, 2 if it has no
   cblas_sgemm or cblas_sgemv. oneMKL also gives the bf16 gemm; mlxp_has_bf16 says whether it did. */
int mlxp_bind(const char *path) {
  void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!h) return 1;
  exact_sgemm = (sgemm_fn)dlsym(h, "cblas_sgemm");
  exact_sgemv = (sgemv_fn)dlsym(h, "cblas_sgemv");
  bf16_gemm = (bf16gemm_fn)dlsym(h, "cblas_gemm_bf16bf16f32");
  return (exact_sgemm && exact_sgemv) ? 0 : 2;
}

int mlxp_has_bf16(void) { return bf16_gemm != 0; }

void mlxp_configure(int bf16, double work, int dim) {
  enabled = bf16 && bf16_gemm;
  min_work = work;
  min_dim = dim;
}

long mlxp_count(int which) { return which >= 0 && which < 3 ? counts[which] : -1; }

static inline uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

static void convert_run(const float *s, uint16_t *d, long n) {
  long i = 0;
#ifdef __AVX512BF16__
  for (; i + 32 <= n; i += 32) {
    __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + i + 16), _mm512_loadu_ps(s + i));
    _mm512_storeu_si512((void *)(d + i), (__m512i)v);
  }
#endif
  for (; i < n; ++i) d[i] = to_bf16(s[i]);
}

/* `outer` runs of `inner` floats, `ld` apart, into a packed bf16 matrix. */
static void convert(const float *src, int outer, int inner, int ld, uint16_t *dst) {
  long n = (long)outer * inner;
  if (ld == inner) {
    long blocks = (n + 65535) / 65536;
#pragma omp parallel for if (n > (1L << 18)) schedule(static)
    for (long b = 0; b < blocks; ++b) {
      long lo = b * 65536, hi = lo + 65536 < n ? lo + 65536 : n;
      convert_run(src + lo, dst + lo, hi - lo);
    }
    return;
  }
#pragma omp parallel for if (n > (1L << 18)) schedule(static)
  for (int o = 0; o < outer; ++o) convert_run(src + (long)o * ld, dst + (long)o * inner, inner);
}

static __thread uint16_t *scratch;
static __thread size_t scratch_len;

void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
  if (order == ROW_MAJOR && (m == 1 || n == 1) && k > 0) {
    counts[2]++;
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
    return;
  }
  if (!enabled || (double)m * n * k < min_work || m < min_dim || n < min_dim || k < min_dim) {
    counts[0]++;
    exact_sgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  /* Stored shapes: op(A) is m x k, op(B) is k x n; "outer" counts rows (row-major) or columns. */
  int a_rows = ta == NO_TRANS ? m : k, a_cols = ta == NO_TRANS ? k : m;
  int b_rows = tb == NO_TRANS ? k : n, b_cols = tb == NO_TRANS ? n : k;
  int a_outer = order == ROW_MAJOR ? a_rows : a_cols, a_inner = order == ROW_MAJOR ? a_cols : a_rows;
  int b_outer = order == ROW_MAJOR ? b_rows : b_cols, b_inner = order == ROW_MAJOR ? b_cols : b_rows;
  size_t need = (size_t)a_outer * a_inner + (size_t)b_outer * b_inner;
  if (need > scratch_len) {
    uint16_t *grown = (uint16_t *)realloc(scratch, need * sizeof(uint16_t));
    if (!grown) { /* out of memory for the copies: do it exactly instead */
      counts[0]++;
      exact_sgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
      return;
    }
    scratch = grown;
    scratch_len = need;
  }
  counts[1]++;
  uint16_t *a16 = scratch, *b16 = scratch + (size_t)a_outer * a_inner;
  convert(a, a_outer, a_inner, lda, a16);
  convert(b, b_outer, b_inner, ldb, b16);
  bf16_gemm(order, ta, tb, m, n, k, alpha, a16, a_inner, b16, b_inner, beta, c, ldc);
}
