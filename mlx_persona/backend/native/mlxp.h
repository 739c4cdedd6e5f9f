/* What the native layer's files share: the worker threads (pool.c), the bf16 products (bf16.c), the pinned
   bf16 copies of weights (pinned.c); sgemm.c dispatches to them. */
#ifndef MLXP_H
#define MLXP_H
#include <stdint.h>

/* fn(ctx, part, parts) for every part in [0, parts): part 0 on the caller, the others on workers that sleep
   between products. Returns parts. A caller that finds the pool busy (MLX calls from several threads) or
   asks for one part runs fn(ctx, 0, 1) alone. */
typedef void (*pool_fn)(void *ctx, int part, int parts);
int pool_run(pool_fn fn, void *ctx, int max_parts);

/* [begin, end) of `n` items in blocks of `block`, for part `part` of `parts`. */
void pool_range(int part, int parts, int n, int block, int *begin, int *end);

uint16_t mlxp_to_bf16(float f);

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
