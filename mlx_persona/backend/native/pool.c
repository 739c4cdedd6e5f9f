/* The threads of the native products (few_rows in sgemm.c, bf16.c): workers that spin briefly, then sleep
   on a condition variable between products. Not OpenMP: GOMP's idle threads spin for milliseconds after
   each parallel region, on the cores OpenBLAS's threads need for the next product (measured: batch-4
   decoding at 29 tok/s with an OpenMP loop, 47 with OMP_WAIT_POLICY=passive). One product at a time uses
   them (MLX may call from several threads: a caller that finds them busy computes alone). */
#include <pthread.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "mlxp.h"

enum { MAX_WORKERS = MLXP_MAX_PARTS - 1 };
static pthread_mutex_t pool_use = PTHREAD_MUTEX_INITIALIZER, pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER, pool_done = PTHREAD_COND_INITIALIZER;
static int pool_started, pool_workers, pool_parts;
static long pool_generation, pool_pending;
static pool_fn pool_job;
static void *pool_ctx;

uint16_t mlxp_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

void mlxp_convert_bf16(const float *s, uint16_t *d, long n) {
  long i = 0;
#ifdef __AVX512BF16__
  for (; i + 32 <= n; i += 32) {
    __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + i + 16), _mm512_loadu_ps(s + i));
    _mm512_storeu_si512((void *)(d + i), (__m512i)v);
  }
#endif
  for (; i < n; ++i) d[i] = mlxp_to_bf16(s[i]);
}

void pool_range(int part, int parts, int n, int block, int *begin, int *end) {
  int blocks = (n + block - 1) / block;
  *begin = (int)((long)blocks * part / parts) * block;
  *end = (int)((long)blocks * (part + 1) / parts) * block;
  if (*end > n) *end = n;
}

/* A worker waiting for the next product, and a caller waiting for its workers, spin for up to SPIN_NS before
   sleeping: a model's products come a few microseconds apart, and waking a sleeping thread costs tens of
   microseconds on a VM for each of them (2-core EPYC, fp32: the forward pass of a 24-token prompt 101-108 ->
   72-80 ms). Bounded, so an idle process does not keep a core busy. */
enum { SPIN_NS = 30000 };

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

static long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* While (*v == value) == equal, for at most ~SPIN_NS. */
static void spin(const long *v, long value, int equal) {
  long until = now_ns() + SPIN_NS;
  for (int i = 0; (__atomic_load_n(v, __ATOMIC_ACQUIRE) == value) == equal; i++) {
    cpu_relax();
    if ((i & 63) == 63 && now_ns() > until) return;
  }
}

static void *pool_main(void *arg) {
  int part = (int)(long)arg;
  long seen = 0;
  for (;;) {
    spin(&pool_generation, seen, 1); /* while no new product */
    pthread_mutex_lock(&pool_lock);
    while (pool_generation == seen) pthread_cond_wait(&pool_wake, &pool_lock);
    seen = pool_generation;
    pool_fn fn = pool_job;
    void *ctx = pool_ctx;
    int parts = pool_parts;
    pthread_mutex_unlock(&pool_lock);
    if (part < parts) fn(ctx, part, parts);
    pthread_mutex_lock(&pool_lock);
    if (__atomic_sub_fetch(&pool_pending, 1, __ATOMIC_RELEASE) == 0) pthread_cond_signal(&pool_done);
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

int pool_run(pool_fn fn, void *ctx, int max_parts) {
  if (max_parts <= 1 || pthread_mutex_trylock(&pool_use) != 0) {
    fn(ctx, 0, 1);
    return 1;
  }
  pool_start(); /* under pool_use */
  int parts = pool_workers + 1 < max_parts ? pool_workers + 1 : max_parts;
  pthread_mutex_lock(&pool_lock);
  pool_job = fn;
  pool_ctx = ctx;
  pool_parts = parts;
  __atomic_store_n(&pool_pending, pool_workers, __ATOMIC_RELAXED);
  __atomic_add_fetch(&pool_generation, 1, __ATOMIC_RELEASE);
  pthread_cond_broadcast(&pool_wake);
  pthread_mutex_unlock(&pool_lock);
  fn(ctx, 0, parts);
  spin(&pool_pending, 0, 0); /* while workers are still at it */
  pthread_mutex_lock(&pool_lock);
  while (pool_pending > 0) pthread_cond_wait(&pool_done, &pool_lock);
  pthread_mutex_unlock(&pool_lock);
  pthread_mutex_unlock(&pool_use);
  return parts;
}
