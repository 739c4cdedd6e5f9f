// The page's logits processing: Hugging Face transformers' chain, in its order, as transformers.js
// logits processors, so that the page samples like `mlx-persona generate` (mlx_persona.sampling):
//
//   1. repetition_penalty     RepetitionPenaltyLogitsProcessor     transformers.js' own
//   2. no_repeat_ngram_size   NoRepeatNGramLogitsProcessor         transformers.js' own
//   3. min_new_tokens         MinNewTokensLengthLogitsProcessor    transformers.js' own
//   4. temperature            TemperatureLogitsWarper              transformers.js' own
//   5. top_k                  TopK (a TopKLogitsWarper)            written here: transformers.js 4.3 has the
//   6. top_p                  TopP (a TopPLogitsWarper)              classes without a `_call`, and does top-k
//   7. min_p                  MinP (a LogitsWarper)                  in its sampler, after every processor
//   8. the draw               Draw (a LogitsProcessor)             written here
//
// Steps 4-8 run only when sampling. generate() is given the chain as `logits_processor`, every setting it
// would apply itself switched off (`builtinOff`) and do_sample=false, so nothing runs twice or out of
// order and its greedy sampler takes the argmax of what the chain leaves: the drawn token when sampling.
// The draw is ours because transformers.js' multinomial sampler first takes the top_k largest scores (all
// of them with top_k=0: ~150 ms a token over Gemma's 262,144-token vocabulary in headless Chromium on a
// 2-core VM, against a few ms for the passes here), and with a top_k of its own it could drop tokens tied
// with our k-th value.
// Semantics are mlx_persona.sampling's: ties at the k-th value all survive top-k, a tie group straddling
// the top-p cut is kept whole, min-p compares log-probabilities (x - max < log(min_p)).

import {
  Tensor,
  LogitsProcessor,
  LogitsWarper,
  LogitsProcessorList,
  MinNewTokensLengthLogitsProcessor,
  NoRepeatNGramLogitsProcessor,
  RepetitionPenaltyLogitsProcessor,
  TemperatureLogitsWarper,
  TopKLogitsWarper,
  TopPLogitsWarper,
  random,
} from "./vendor/transformers/transformers.min.js";

// Each row of a [batch, vocab] float32 tensor, as a view on its data.
function* rows(logits) {
  for (let b = 0; b < logits.dims[0]; ++b) yield logits[b].data;
}

// Loops over typed arrays are indexed: V8 leaves `for...of` over them unoptimised (70x slower).

// The k-th largest value (1 <= k <= length): a min-heap of the k largest seen, O(length log k), for k up to
// 4096 (3 ms over 262,144 values); a sorted copy beyond.
export function kthLargest(values, k) {
  if (k > 4096) return new Float32Array(values).sort()[values.length - k];
  const heap = new Float32Array(k);
  let n = 0;
  for (let j = 0; j < values.length; ++j) {
    const v = values[j];
    let i;
    if (n < k) {
      i = n++;
      while (i > 0 && heap[(i - 1) >> 1] > v) {
        heap[i] = heap[(i - 1) >> 1];
        i = (i - 1) >> 1;
      }
    } else if (v > heap[0]) {
      i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const m = l + 1 < k && heap[l + 1] < heap[l] ? l + 1 : l;
        if (l >= k || heap[m] >= v) break;
        heap[i] = heap[m];
        i = m;
      }
    } else continue;
    heap[i] = v;
  }
  return heap[0];
}

// The values of `row` >= `cut` that are finite, largest first.
function valuesFrom(row, cut) {
  const out = [];
  for (let i = 0; i < row.length; ++i) if (row[i] >= cut && row[i] > -Infinity) out.push(row[i]);
  return Float32Array.from(out).sort().reverse();
}

// The smallest value top-p keeps: over the surviving (finite) values sorted ascending, the prefix whose
// cumulative probability is <= 1 - top_p goes, never the largest value. Equivalently, from the top down, a
// value is kept while the probability above it is < top_p; so only the largest values are sorted: the top
// 256, then the top 4096, then all (not the whole vocabulary, unless the distribution is that flat).
export function topPThreshold(row, topP) {
  let max = -Infinity;
  let finite = 0;
  for (let i = 0; i < row.length; ++i) {
    if (row[i] > -Infinity) {
      ++finite;
      if (row[i] > max) max = row[i];
    }
  }
  if (finite === 0) return -Infinity;
  let z = 0;
  for (let i = 0; i < row.length; ++i) if (row[i] > -Infinity) z += Math.exp(row[i] - max);
  for (const k of [256, 4096, finite]) {
    const top = valuesFrom(row, k < finite ? kthLargest(row, k) : -Infinity);
    let above = 0;
    for (let j = 0; j < top.length; ++j) {
      if (j > 0 && above >= topP) return top[j - 1];
      above += Math.exp(top[j] - max) / z;
    }
    if (k >= finite) return top[top.length - 1];
  }
}

function maskBelow(row, threshold) {
  for (let i = 0; i < row.length; ++i) if (row[i] < threshold) row[i] = -Infinity;
}

class TopK extends TopKLogitsWarper {
  _call(input_ids, logits) {
    for (const row of rows(logits)) {
      if (this.top_k < row.length) maskBelow(row, kthLargest(row, this.top_k)); // k >= vocab: off
    }
    return logits;
  }
}

class TopP extends TopPLogitsWarper {
  _call(input_ids, logits) {
    for (const row of rows(logits)) maskBelow(row, topPThreshold(row, this.top_p));
    return logits;
  }
}

class MinP extends LogitsWarper {
  constructor(min_p) {
    super();
    this.log_min_p = Math.log(min_p);
  }

  _call(input_ids, logits) {
    for (const row of rows(logits)) {
      let max = -Infinity;
      for (let i = 0; i < row.length; ++i) if (row[i] > max) max = row[i];
      for (let i = 0; i < row.length; ++i) if (row[i] - max < this.log_min_p) row[i] = -Infinity;
    }
    return logits;
  }
}

// Step 8: draws one token from softmax(scores) and leaves it the only finite score (0), so that generate()'s
// greedy sampler returns it. `rng` has random() in [0, 1): transformers.js' Random (MT19937, seeded) or its
// shared instance.
class Draw extends LogitsProcessor {
  constructor(rng) {
    super();
    this.rng = rng;
  }

  _call(input_ids, logits) {
    for (const row of rows(logits)) {
      let max = -Infinity;
      for (let i = 0; i < row.length; ++i) if (row[i] > max) max = row[i];
      const weight = new Float32Array(row.length);
      let z = 0;
      for (let i = 0; i < row.length; ++i) if (row[i] > -Infinity) z += weight[i] = Math.exp(row[i] - max);
      let u = this.rng.random() * z;
      let pick = -1;
      for (let i = 0; i < row.length && u >= 0; ++i) {
        if (weight[i] > 0) {
          pick = i;
          u -= weight[i];
        }
      }
      row.fill(-Infinity);
      row[pick] = 0;
    }
    return logits;
  }
}

const isInt = (v, min) => Number.isInteger(v) && v >= min;
const RULES = {
  temperature: [(v) => Number.isFinite(v) && v > 0, "a number > 0 when sampling (untick Sample for greedy)"],
  top_k: [(v) => isInt(v, 0), "an integer >= 0 (0 = off)"],
  top_p: [(v) => Number.isFinite(v) && v > 0 && v <= 1, "a number in (0, 1] (1 = off)"],
  min_p: [(v) => Number.isFinite(v) && v >= 0 && v <= 1, "a number in [0, 1] (0 = off)"],
  repetition_penalty: [(v) => Number.isFinite(v) && v > 0, "a number > 0 (1 = off)"],
  no_repeat_ngram_size: [(v) => isInt(v, 0), "an integer >= 0 (0 = off)"],
  min_new_tokens: [(v) => isInt(v, 0), "an integer >= 0"],
  max_new_tokens: [(v) => isInt(v, 1), "an integer >= 1"],
  seed: [(v) => v === null || (isInt(v, 0) && v < 2 ** 32), "empty (random) or an integer in [0, 2**32)"],
};

// Throws, naming the setting, for a value mlx-persona's GenerationConfig would refuse.
export function checkSettings(s) {
  for (const [key, [ok, rule]] of Object.entries(RULES)) {
    if (key in s && !(key === "temperature" && !s.do_sample) && !ok(s[key])) {
      throw new Error(`${key} must be ${rule}, got ${s[key]}`);
    }
  }
}

// Steps 1-7: the scores of one step. `promptLength` tokens of the history are the prompt; `eos` lists every
// end id (banned while fewer than min_new_tokens new tokens exist).
export function logitsProcessors(s, { promptLength, eos }) {
  checkSettings(s);
  const chain = new LogitsProcessorList();
  if (s.repetition_penalty !== 1) chain.push(new RepetitionPenaltyLogitsProcessor(s.repetition_penalty));
  if (s.no_repeat_ngram_size > 0) chain.push(new NoRepeatNGramLogitsProcessor(s.no_repeat_ngram_size));
  if (s.min_new_tokens > 0 && eos.length > 0) {
    chain.push(new MinNewTokensLengthLogitsProcessor(promptLength, s.min_new_tokens, eos));
  }
  if (s.do_sample) {
    if (s.temperature !== 1) chain.push(new TemperatureLogitsWarper(s.temperature));
    if (s.top_k > 0) chain.push(new TopK(s.top_k));
    if (s.top_p < 1) chain.push(new TopP(s.top_p));
    if (s.min_p > 0) chain.push(new MinP(s.min_p));
  }
  return chain;
}

// Steps 1-8, for generate(): the draw comes last when sampling, seeded by `s.seed` when it is a number.
export function generationProcessors(s, opts) {
  const chain = logitsProcessors(s, opts);
  if (s.do_sample) chain.push(new Draw(s.seed == null ? random : new random.Random(s.seed)));
  return chain;
}

// generate() options that switch off what transformers.js would apply itself (the chain does it all).
export const builtinOff = {
  do_sample: false,
  repetition_penalty: 1.0,
  no_repeat_ngram_size: 0,
  min_new_tokens: 0,
  temperature: 1.0,
  top_k: 0,
  top_p: 1.0,
};

// One step of the chain, for tests: next-token `logits` (numbers) after the token `history`, of which the
// first `promptLength` are the prompt. Returns the processed scores (-Infinity where excluded).
export function processScores(logits, history, { promptLength, eos = [], settings }) {
  const scores = new Tensor("float32", Float32Array.from(logits), [1, logits.length]);
  const out = logitsProcessors(settings, { promptLength, eos })([history.map((t) => BigInt(t))], scores);
  return Array.from(out.data);
}
