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
 * - A few rows times a weight matrix (2 <= m <= 8: batched decoding, x W^T; from 16 rows OpenBLAS is faster)
 *   goes to few_rows below. OpenBLAS packs the whole weight matrix for them too: 0.41 ms for 4 rows of a
 *   2048 x 640 layer against 0.05 ms here (2 cores, AVX-512); the same products, summed in another order.
 * - With bf16 on (MLX_PERSONA_MATMUL=bf16, oneMKL), large products have their inputs rounded to
 *   bfloat16 (round to nearest even) and go to oneMKL's cblas_gemm_bf16bf16f32, which runs on the
 *   CPU's AMX tiles (or AVX512-BF16) and accumulates and writes float32: the numerics of PyTorch's bf16
 *   autocast of a matmul, with a float32 result. Small or thin products (LoRA's rank-r matmuls) stay
 *   exact. Everything that is not a matmul is untouched and stays float32.
 *
 * MLX can call this from several stream threads at once: the conversion buffers are per thread.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <unistd.h>
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
static int few_rows_on = 1; /* MLX_PERSONA_FEW_ROWS=0 turns few_rows off (benchmarks, bisecting) */
static double min_work = 4194304.0; /* m*n*k below this: exact */
static int min_dim = 32;            /* any of m, n, k below this: exact */
static long counts[4]; /* [exact sgemm, bf16, sgemv, few rows] calls; racy, for tests and doctor only */

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
  const char *few = getenv("MLX_PERSONA_FEW_ROWS");
  few_rows_on = !(few && few[0] == '0' && few[1] == 0);
  enabled = bf16 && bf16_gemm;
  min_work = work;
  min_dim = dim;
}

long mlxp_count(int which) { return which >= 0 && which < 4 ? counts[which] : -1; }

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
    for (int i0 = 0; i0 < m; i0 += 4) {
      int in = m - i0 < 4 ? m - i0 : 4;
      const float *ai[4];
      for (int r = 0; r < 4; r++) ai[r] = a + (long)(i0 + (r < in ? r : 0)) * lda;
      v16 acc[4][4];
      memset(acc, 0, sizeof acc);
      for (int p = 0; p < k16; p += 16) {
        v16 x0 = load16(ai[0] + p), x1 = load16(ai[1] + p), x2 = load16(ai[2] + p), x3 = load16(ai[3] + p);
        for (int t = 0; t < 4; t++) {
          v16 w = load16(bj[t] + p);
          acc[0][t] += x0 * w;
          acc[1][t] += x1 * w;
          acc[2][t] += x2 * w;
          acc[3][t] += x3 * w;
        }
      }
      for (int r = 0; r < in; r++)
        for (int t = 0; t < jn; t++) {
          float s = 0.0f;
          for (int l = 0; l < 16; l++) s += acc[r][t][l];
          for (int p = k16; p < k; p++) s += ai[r][p] * bj[t][p];
          float *out = c + (long)(i0 + r) * ldc + j0 + t;
          *out = beta == 0.0f ? alpha * s : alpha * s + beta * *out; /* beta 0: C is not read (BLAS) */
        }
    }
  }
}

/* The threads of few_rows: workers that sleep on a condition variable between products. Not OpenMP:
   GOMP's idle threads spin for milliseconds after each parallel region, on the cores OpenBLAS's threads
   need for the next product (measured: batch-4 decoding at 29 tok/s with an OpenMP loop here, 47 with
   OMP_WAIT_POLICY=passive). One product at a time uses them (MLX may call from several threads: a caller
   that finds them busy computes alone). */
enum { MAX_WORKERS = 15 };
static pthread_mutex_t pool_use = PTHREAD_MUTEX_INITIALIZER, pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER, pool_done = PTHREAD_COND_INITIALIZER;
static int pool_started, pool_workers, pool_parts, pool_pending;
static long pool_generation;
static struct few_job pool_job;

static void pool_range(int part, int parts, int n, int *begin, int *end) {
  int blocks = (n + 3) / 4;
  *begin = (int)((long)blocks * part / parts) * 4;
  *end = (int)((long)blocks * (part + 1) / parts) * 4;
  if (*end > n) *end = n;
}

static void *pool_main(void *arg) {
  int part = (int)(long)arg;
  long seen = 0;
  for (;;) {
    pthread_mutex_lock(&pool_lock);
    while (pool_generation == seen) pthread_cond_wait(&pool_wake, &pool_lock);
    seen = pool_generation;
    struct few_job q = pool_job;
    int parts = pool_parts;
    pthread_mutex_unlock(&pool_lock);
    if (part < parts) {
      int begin, end;
      pool_range(part, parts, q.n, &begin, &end);
      if (begin < end) few_rows_part(&q, begin, end);
    }
    pthread_mutex_lock(&pool_lock);
    if (--pool_pending == 0) pthread_cond_signal(&pool_done);
    pthread_mutex_unlock(&pool_lock);
  }
  return 0;
}

/* A forked child has none of the parent's threads: it starts its own pool when it needs one. */
static void pool_after_fork(void) {
  pool_started = pool_workers = pool_pending = 0;
  pool_generation = 0; /* the new workers start from 0: no parent's job is run again */
  pthread_mutex_init(&pool_use, 0);
  pthread_mutex_init(&pool_lock, 0);
  pthread_cond_init(&pool_wake, 0);
  pthread_cond_init(&pool_done, 0);
}

static void pool_start(void) {
  if (pool_started) return;
  pool_started = 1;
  static int registered;
  if (!registered && pthread_atfork(0, 0, pool_after_fork) == 0) registered = 1;
  long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  int want = cpus > 1 ? (int)(cpus - 1) : 0;
  if (want > MAX_WORKERS) want = MAX_WORKERS;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  for (int i = 0; i < want; i++) {
    pthread_t t;
    if (pthread_create(&t, &attr, pool_main, (void *)(long)(i + 1)) != 0) break;
    pool_workers++;
  }
  pthread_attr_destroy(&attr);
}

static void few_rows(int m, int n, int k, float alpha, const float *a, int lda, const float *b, int ldb,
                     float beta, float *c, int ldc) {
  struct few_job q = {m, n, k, lda, ldb, ldc, alpha, beta, a, b, c};
  if ((double)n * k * m < 262144.0 || pthread_mutex_trylock(&pool_use) != 0) {
    few_rows_part(&q, 0, n);
    return;
  }
  pool_start(); /* under pool_use */
  int parts = pool_workers + 1;
  pthread_mutex_lock(&pool_lock);
  pool_job = q;
  pool_parts = parts;
  pool_pending = pool_workers;
  pool_generation++;
  pthread_cond_broadcast(&pool_wake);
  pthread_mutex_unlock(&pool_lock);
  int begin, end;
  pool_range(0, parts, n, &begin, &end);
  if (begin < end) few_rows_part(&q, begin, end);
  pthread_mutex_lock(&pool_lock);
  while (pool_pending > 0) pthread_cond_wait(&pool_done, &pool_lock);
  pthread_mutex_unlock(&pool_lock);
  pthread_mutex_unlock(&pool_use);
}

/* Only where the 4 x 4 tile of 16-float accumulators fits the registers (AVX-512: 32 of them); built
   without it the tile spills to the stack on every FMA, and OpenBLAS is left the product. */
static int few_rows_fit(int order, int ta, int tb, int m, int n, int k) {
#ifndef __AVX512F__
  (void)order, (void)ta, (void)tb, (void)m, (void)n, (void)k;
  return 0;
#endif
  return order == ROW_MAJOR && ta == NO_TRANS && tb == TRANS && m >= 2 && m <= 8 && k >= 16 && n >= 4;
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
  if (few_rows_fit(order, ta, tb, m, n, k) && few_rows_on) {
    counts[3]++;
    few_rows(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
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
