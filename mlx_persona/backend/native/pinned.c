/* Pinned weights: a bf16 copy, made once, of a float32 matrix that does not change while it is pinned.
 *
 * With bf16 inputs on, the sgemm layer would otherwise round a frozen weight to bf16 on every product it
 * enters (twice per training step, once per decoded token); with a copy it reads 2 bytes per weight
 * instead of 4. Python (mlx_persona/backend/sgemm.py) pins the frozen weights of a model and holds a
 * reference to each array until it unpins it, so its memory is neither freed nor reused (MLX donates a
 * buffer to an op's output only when nothing else refers to it), and MLX arrays are not written in place.
 * A product is matched to a copy by address: its operand must lie inside one pinned matrix, with the same
 * leading dimension.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "mlxp.h"

struct pin {
  const float *f;
  uint16_t *h;
  long rows, cols;
};

static pthread_rwlock_t pins_lock = PTHREAD_RWLOCK_INITIALIZER;
static struct pin *pins;
static int npins, cap;

/* A product that may use copies holds the read lock from its look-ups to its end, so that unpinning (the
   write lock) waits for it. With nothing pinned it takes no lock (a pin made meanwhile is missed, harmlessly). */
int mlxp_pins_hold(void) {
  if (npins == 0) return 0;
  pthread_rwlock_rdlock(&pins_lock);
  return 1;
}

void mlxp_pins_release(int held) {
  if (held) pthread_rwlock_unlock(&pins_lock);
}

const uint16_t *mlxp_pinned_view(const float *p, int trans, int rows, int cols, int ld) {
  long srows = trans == 112 ? cols : rows, scols = trans == 112 ? rows : cols; /* as stored */
  for (int i = 0; i < npins; i++) {
    const struct pin *e = &pins[i];
    if (ld != e->cols || p < e->f || p >= e->f + e->rows * e->cols) continue;
    long off = p - e->f, r0 = off / e->cols, c0 = off % e->cols;
    if (r0 + srows <= e->rows && c0 + scols <= e->cols) return e->h + off;
  }
  return 0;
}

enum { CHUNK = 1 << 16 };

struct copy_job {
  const float *f;
  uint16_t *h;
  long n;
};

static void copy_part(void *ctx, int part, int parts) {
  const struct copy_job *q = ctx;
  int chunks = (int)((q->n + CHUNK - 1) / CHUNK), begin, end;
  pool_range(part, parts, chunks, 1, &begin, &end);
  for (long c = begin; c < end; c++) {
    long lo = c * CHUNK, len = q->n - lo < CHUNK ? q->n - lo : CHUNK;
    mlxp_convert_bf16(q->f + lo, q->h + lo, len);
  }
}

/* 0: pinned; 1: pinned already; 2: overlaps a pinned matrix; -1: out of memory. */
int mlxp_pin(const float *f, long rows, long cols) {
  long n = rows * cols;
  uint16_t *h = (uint16_t *)malloc((size_t)n * 2);
  if (!h) return -1;
  struct copy_job job = {f, h, n}; /* on the pool's threads (the pages of the copy are first touched there too) */
  pool_run(copy_part, &job, (int)((n + CHUNK - 1) / CHUNK));
  pthread_rwlock_wrlock(&pins_lock);
  int rc = 0;
  for (int i = 0; i < npins && rc == 0; i++)
    if (f < pins[i].f + pins[i].rows * pins[i].cols && pins[i].f < f + n) rc = pins[i].f == f ? 1 : 2;
  if (rc == 0 && npins == cap) {
    struct pin *grown = (struct pin *)realloc(pins, sizeof(struct pin) * (size_t)(cap ? 2 * cap : 64));
    if (grown) {
      pins = grown;
      cap = cap ? 2 * cap : 64;
    } else {
      rc = -1;
    }
  }
  if (rc == 0) pins[npins++] = (struct pin){f, h, rows, cols};
  pthread_rwlock_unlock(&pins_lock);
  if (rc != 0) free(h);
  return rc;
}

/* 0: unpinned; 1: not pinned. */
int mlxp_unpin(const float *f) {
  uint16_t *h = 0;
  pthread_rwlock_wrlock(&pins_lock);
  for (int i = 0; i < npins; i++)
    if (pins[i].f == f) {
      h = pins[i].h;
      pins[i] = pins[--npins];
      break;
    }
  pthread_rwlock_unlock(&pins_lock);
  free(h); /* no product reads it: one that could holds the read lock to its end */
  return h ? 0 : 1;
}

long mlxp_pinned_bytes(void) {
  long total = 0;
  pthread_rwlock_rdlock(&pins_lock);
  for (int i = 0; i < npins; i++) total += pins[i].rows * pins[i].cols * 2;
  pthread_rwlock_unlock(&pins_lock);
  return total;
}
