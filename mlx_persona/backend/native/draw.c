/* The draw of the next token on the CPU, a whole batch of rows in one call: transformers' warpers
   (temperature -> top-k -> top-p -> min-p, as mlx_persona.sampling.warpers applies them) and a categorical
   draw, or the greedy argmax.

   Why: on MLX's CPU backend each of the sampler's vocabulary-wide ops runs on one core with scalar
   reductions (a max over Gemma's 262,144 logits: 0.4 ms; the log-softmax before the draw: 1.6 ms; the
   sampler: 1.8 ms), ~3.5 ms a row every token, ~50 ms a step at 16 rows. Here the vocabulary is read once:
   the maximum of every block of BLOCK logits; the k-th largest value v of the row lies in the blocks whose
   maximum is >= the k-th largest block maximum (fewer than k entries exceed v, so fewer than k blocks have
   a maximum above v), and every later step works on those few blocks. No log-softmax is needed: every
   warper and the draw are invariant to a per-row shift of the logits.

   Semantics (those of sample_top_k): y = x / temperature; S = the entries with y > v (fewer than k); the
   tokens tied with v form one slot of weight v + log(ties); top-p keeps the smallest suffix of the sorted
   survivors whose probability exceeds top_p (never fewer than one), min-p drops what is below
   min_p * max. The draw is a Gumbel-max over the slots with its own counter-based generator (splitmix64
   of seed, counter and slot), so a row's draw depends on its seed, its counter and its logits alone; a
   tie slot that wins picks a uniform member of the tie in vocabulary order. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mlxp.h"

enum { BLOCK = 64, STACK_ENTRIES = 8192 };

struct draw_job {
  int rows, vocab;
  const float *const *x;    /* each row's logits */
  const float *temperature; /* <= 0: greedy */
  const int *top_k;         /* 0 < top_k < vocab when sampling */
  const float *top_p, *min_p;
  const uint64_t *seed, *counter;
  int *token;
  float *probs; /* when not 0: each row's distribution over the vocabulary (tests), instead of a draw */
};

static inline uint64_t mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/* Uniform in (0, 1): the j-th number of the stream (seed, counter). */
static inline double unit(uint64_t seed, uint64_t counter, uint64_t j) {
  uint64_t z = mix64(mix64(seed ^ mix64(counter)) + j);
  return ((double)(z >> 11) + 0.5) * 0x1.0p-53;
}

static void block_max(const float *x, int vocab, float scale, float *out) {
  int blocks = (vocab + BLOCK - 1) / BLOCK;
  for (int b = 0; b < blocks; b++) {
    int lo = b * BLOCK, hi = lo + BLOCK < vocab ? lo + BLOCK : vocab;
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int i = lo; i < hi; i++) m = x[i] > m ? x[i] : m;
    out[b] = m / scale; /* dividing by a positive number keeps the order, so this is the max of x / scale */
  }
}

static int greedy(const float *x, int vocab, float *scratch) {
  int blocks = (vocab + BLOCK - 1) / BLOCK;
  block_max(x, vocab, 1.0f, scratch);
  int best = 0;
  for (int b = 1; b < blocks; b++)
    if (scratch[b] > scratch[best]) best = b;
  int hi = best * BLOCK + BLOCK < vocab ? best * BLOCK + BLOCK : vocab;
  for (int i = best * BLOCK; i < hi; i++)
    if (x[i] == scratch[best]) return i;
  return best * BLOCK; /* a block of NaNs */
}

/* The k-th largest of a[0..n) (0 < k <= n), reordering a (quickselect, descending). */
static float kth_largest(float *a, int n, int k) {
  int lo = 0, hi = n - 1, want = k - 1;
  while (lo < hi) {
    float pivot = a[lo + (hi - lo) / 2];
    int i = lo, j = hi;
    while (i <= j) {
      while (a[i] > pivot) i++;
      while (a[j] < pivot) j--;
      if (i <= j) {
        float t = a[i];
        a[i] = a[j];
        a[j] = t;
        i++;
        j--;
      }
    }
    if (want <= j) hi = j;
    else if (want >= i) lo = i;
    else break;
  }
  return a[want];
}

static int by_value(const void *p, const void *q) {
  float a = *(const float *)p, b = *(const float *)q;
  return (a > b) - (a < b);
}

/* One sampled row. `blk` holds (vocab / BLOCK) floats, `val`/`ids` room for the gathered entries. */
static void sample_row(const struct draw_job *q, int r, float *blk) {
  const float *x = q->x[r];
  const int vocab = q->vocab, blocks = (vocab + BLOCK - 1) / BLOCK;
  int k = q->top_k[r];
  const float t = q->temperature[r];
  block_max(x, vocab, t, blk);
  /* The k-th largest block maximum (all blocks when there are no more than k). */
  float *tmp = (float *)malloc(sizeof(float) * (size_t)blocks);
  float floor_ = -INFINITY;
  if (tmp && k < blocks) {
    memcpy(tmp, blk, sizeof(float) * (size_t)blocks);
    floor_ = kth_largest(tmp, blocks, k);
  }
  free(tmp);
  int gathered = 0;
  for (int b = 0; b < blocks; b++)
    if (blk[b] >= floor_) gathered += BLOCK;
  float stack_val[STACK_ENTRIES];
  int stack_ids[STACK_ENTRIES];
  float *val = stack_val, *heap = 0;
  int *ids = stack_ids;
  if (gathered > STACK_ENTRIES) {
    heap = (float *)malloc((sizeof(float) + sizeof(int)) * (size_t)gathered);
    if (!heap) { q->token[r] = -1; return; }
    val = heap;
    ids = (int *)(heap + gathered);
  }
  int n = 0;
  for (int b = 0; b < blocks; b++) {
    if (blk[b] < floor_) continue;
    int hi = b * BLOCK + BLOCK < vocab ? b * BLOCK + BLOCK : vocab;
    for (int i = b * BLOCK; i < hi; i++) {
      float y = t == 1.0f ? x[i] : x[i] / t;
      if (y >= floor_) { val[n] = y; ids[n] = i; n++; }
    }
  }
  /* n >= k: each block kept holds its maximum, which is >= floor_ (only NaN logits, never kept, make fewer). */
  if (n < k) k = n;
  if (k == 0) { q->token[r] = 0; free(heap); return; }
  float *sel = (float *)malloc(sizeof(float) * (size_t)n);
  if (!sel) { free(heap); q->token[r] = -1; return; }
  memcpy(sel, val, sizeof(float) * (size_t)n);
  const float v = kth_largest(sel, n, k);
  free(sel);
  int above = 0, ties = 0;
  for (int i = 0; i < n; i++) {
    if (val[i] > v) { val[above] = val[i]; ids[above] = ids[i]; above++; } /* in vocabulary order */
    else if (val[i] == v) ties++;
  }
  /* top-p over the survivors sorted ascending: (k - above) copies of v, then S, plus ties - (k - above)
     extra copies of v that top-k also keeps (they carry mass, sort first). */
  float *sorted = (float *)malloc(sizeof(float) * (size_t)k);
  if (!sorted) { free(heap); q->token[r] = -1; return; }
  for (int i = 0; i < k - above; i++) sorted[i] = v;
  memcpy(sorted + (k - above), val, sizeof(float) * (size_t)above);
  qsort(sorted + (k - above), (size_t)above, sizeof(float), by_value);
  float top = sorted[k - 1], threshold = v;
  if (q->top_p[r] < 1.0f) {
    double extra = (double)(ties - (k - above)) * exp((double)v - top), z = extra;
    for (int i = 0; i < k; i++) z += exp((double)sorted[i] - top);
    double cum = extra / z, cut = 1.0 - (double)q->top_p[r];
    int removed = 0;
    for (int i = 0; i < k; i++) {
      cum += exp((double)sorted[i] - top) / z;
      if (cum <= cut) removed++;
    }
    if (removed > k - 1) removed = k - 1;
    threshold = sorted[removed];
  }
  const float log_min_p = q->min_p[r] > 0.0f ? (float)log((double)q->min_p[r]) : -INFINITY;
  const int tie_keep = v >= threshold && v - top >= log_min_p && v > -INFINITY;
  const float tie_weight = v + logf((float)ties);
  if (q->probs) { /* the distribution the draw follows, for the tests */
    float *p = q->probs + (size_t)r * vocab;
    double z = tie_keep ? (double)ties * exp((double)v - top) : 0.0;
    for (int i = 0; i < above; i++)
      if (val[i] >= threshold && val[i] - top >= log_min_p) z += exp((double)val[i] - top);
    for (int i = 0; i < vocab; i++) p[i] = 0.0f;
    for (int i = 0; i < above; i++)
      if (val[i] >= threshold && val[i] - top >= log_min_p) p[ids[i]] = (float)(exp((double)val[i] - top) / z);
    if (tie_keep)
      for (int b = 0; b < blocks; b++) {
        int hi = b * BLOCK + BLOCK < vocab ? b * BLOCK + BLOCK : vocab;
        if (blk[b] >= v)
          for (int i = b * BLOCK; i < hi; i++)
            if ((t == 1.0f ? x[i] : x[i] / t) == v) p[i] = (float)(exp((double)v - top) / z);
      }
    q->token[r] = 0;
    free(sorted);
    free(heap);
    return;
  }
  /* Gumbel-max over the slots: S's members by their place in vocabulary order, the tie slot as slot k. */
  const uint64_t seed = q->seed[r], counter = q->counter[r];
  double best = -INFINITY;
  int winner = -1;
  for (int i = 0; i < above; i++) {
    if (!(val[i] >= threshold && val[i] - top >= log_min_p)) continue;
    double g = (double)val[i] - log(-log(unit(seed, counter, (uint64_t)i)));
    if (g > best) { best = g; winner = i; }
  }
  if (tie_keep) {
    double g = (double)tie_weight - log(-log(unit(seed, counter, (uint64_t)k)));
    if (g > best || winner < 0) winner = k;
  }
  if (winner >= 0 && winner < k) {
    q->token[r] = ids[winner];
  } else {
    /* The tie slot: its member number m (uniform) in vocabulary order, counted over the blocks that hold v. */
    uint64_t m = (uint64_t)(unit(seed, counter, (uint64_t)k + 1) * (double)ties);
    if (m >= (uint64_t)ties) m = (uint64_t)ties - 1;
    int found = -1;
    for (int b = 0; b < blocks && found < 0; b++) {
      if (blk[b] < v) continue;
      int hi = b * BLOCK + BLOCK < vocab ? b * BLOCK + BLOCK : vocab;
      for (int i = b * BLOCK; i < hi; i++)
        if ((t == 1.0f ? x[i] : x[i] / t) == v && m-- == 0) { found = i; break; }
    }
    q->token[r] = found;
  }
  free(sorted);
  free(heap);
}

static void draw_part(void *ctx, int part, int parts) {
  const struct draw_job *q = ctx;
  int begin, end;
  pool_range(part, parts, q->rows, 1, &begin, &end);
  float *blk = (float *)malloc(sizeof(float) * (size_t)((q->vocab + BLOCK - 1) / BLOCK));
  for (int r = begin; r < end; r++) {
    if (!blk) q->token[r] = -1;
    else if (q->temperature[r] <= 0.0f) q->token[r] = greedy(q->x[r], q->vocab, blk);
    else sample_row(q, r, blk);
  }
  free(blk);
}

/* Draws one token for each of `rows` rows of `vocab` logits; token[r] = -1 where memory ran out. A row with
   temperature <= 0 takes the argmax (the first index of the maximum); any other needs 0 < top_k < vocab. */
int mlxp_draw(int rows, int vocab, const float *const *x, const float *temperature, const int *top_k,
              const float *top_p, const float *min_p, const uint64_t *seed, const uint64_t *counter, int *token,
              float *probs) {
  struct draw_job q = {rows, vocab, x, temperature, top_k, top_p, min_p, seed, counter, token, probs};
  pool_run(draw_part, &q, rows);
  for (int r = 0; r < rows; r++)
    if (token[r] < 0) return -1;
  return 0;
}
