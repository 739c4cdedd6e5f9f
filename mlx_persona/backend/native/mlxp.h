/* What the native layer's files share: the worker threads (pool.c), the bf16 products (bf16.c), the pinned
   bf16 copies of weights (pinned.c); sgemm.c dispatches to them. */
#ifndef MLXP_H
#define MLXP_H
#include <stdint.h>

/* fn(ctx, part, parts) for every part in [0, parts): part 0 on the caller, the others on workers that sleep
   between products. Returns parts. A caller that finds the pool busy (MLX calls from several threads) or
   asks for one part runs fn(ctx, 0, 1) alone. */
typedef void (*pool_fn)(void *ctx, int part, int parts);
enum { MLXP_MAX_PARTS = 16 }; /* pool_run never makes more parts than this (its workers + the caller) */
int pool_run(pool_fn fn, void *ctx, int max_parts);

/* [begin, end) of `n` items in blocks of `block`, for part `part` of `parts`. */
void pool_range(int part, int parts, int n, int block, int *begin, int *end);

uint16_t mlxp_to_bf16(float f);
/* d[0..n) = s[0..n) rounded to bf16 (round to nearest even, NaN kept quiet), 32 at a time with AVX512-BF16. */
void mlxp_convert_bf16(const float *s, uint16_t *d, long n);

/* How far ahead (in weight rows) the few-rows kernels of sgemm.c and bf16.c prefetch the weight matrix
   they stream. */
enum { PREFETCH_ROWS = 8 };

/* Keeps a vector variable in a register from here on: the compiler may no longer fold its load into each
   instruction that uses it (an empty asm that claims to change it). */
#if defined(__GNUC__) && defined(__x86_64__)
#define PIN(v) __asm__("" : "+v"(v))
#elif defined(__GNUC__) && defined(__aarch64__)
#define PIN(v) __asm__("" : "+w"(v))
#else
#define PIN(v) (void)(v)
#endif

#ifdef __AVX512F__
#include <immintrin.h>
/* The sums of a 4 x 4 tile of 16-float accumulators: out[r * 4 + t] = the sum of acc[r][t]'s lanes. A tree
   of shuffles and adds, ~45 instructions for the 16 sums where 16 horizontal reductions take ~130: at
   k = 640 the few-rows kernels spend a fifth of their time summing otherwise. */
static inline void mlxp_sum_tile(const __m512 acc[4][4], float out[16]) {
  __m512 x[8], y[4], z[2];
  for (int i = 0; i < 8; i++) { /* v[i] = acc[i % 4][i / 4]; pairs: [v0's 8 partials | v1's 8] */
    __m512 a = acc[(2 * i) % 4][(2 * i) / 4], b = acc[(2 * i + 1) % 4][(2 * i + 1) / 4];
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int j = 0; j < 4; j++) /* 128-bit lane L: v[4j + L]'s 4 partials */
    y[j] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * j], x[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(x[2 * j], x[2 * j + 1], 0xDD));
  for (int m = 0; m < 2; m++) /* lane L: 2 partials of v[8m + L], 2 of v[8m + 4 + L] */
    z[m] = _mm512_add_ps(_mm512_shuffle_ps(y[2 * m], y[2 * m + 1], 0x44),
                         _mm512_shuffle_ps(y[2 * m], y[2 * m + 1], 0xEE));
  /* lane L: the sums of v[L], v[4 + L], v[8 + L], v[12 + L] = acc[L][0..3] */
  _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x88), _mm512_shuffle_ps(z[0], z[1], 0xDD)));
}
#endif

/* bf16.c: C (m x n) = alpha op(A) op(B) + beta C on bf16 inputs (float32 accumulation and output), row-major.
   a16/b16 (may be 0): a bf16 copy of A/B with the same layout and leading dimension, used instead of rounding
   a/b. Both return 0, or -1 when out of memory for their buffers (nothing written). Built only where the compiler targets AVX512-BF16; mlxp_bf16_kernel says whether it was. */
int mlxp_bf16_kernel(void);
int mlxp_bf16_gemm(int ta, int tb, int m, int n, int k, float alpha, const float *a, const uint16_t *a16,
                    int lda, const float *b, const uint16_t *b16, int ldb, float beta, float *c, int ldc);
/* A few rows (decoding, short prompts: any m, best to ~48) times a bf16 weight matrix: C = alpha A W^T + beta C, W n x k (ldw apart). */
int mlxp_bf16_rows(int m, int n, int k, float alpha, const float *a, int lda, const uint16_t *w, int ldw,
                    float beta, float *c, int ldc);

/* pinned.c: bf16 copies of float32 matrices that do not change while pinned (frozen weights; Python keeps
   the arrays alive). mlxp_pinned_view: the copy of the op(X) (rows x cols, ld apart, trans 112) starting at
   `p`, when it lies inside one pinned matrix with the same leading dimension; else 0. Only between
   held = mlxp_pins_hold() and mlxp_pins_release(held), which span the product that reads the copy. */
int mlxp_pins_hold(void);
void mlxp_pins_release(int held);
const uint16_t *mlxp_pinned_view(const float *p, int trans, int rows, int cols, int ld);

#endif
