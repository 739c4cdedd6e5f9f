// x @ dequantize(w).T for MLX's affine quantization on the CPU (mlx_persona.backend.qmatmul builds it).
//
// MLX's own CPU quantized matmul walks the weights one value at a time; a 4-bit gemma-3-270m decoded
// ~5x slower than in float32. This primitive computes the same product, for x of float32 and w packed
// 2, 4 or 8 bits per value (group size 32, 64 or 128, float32 scales and biases), with 16-lane AVX-512
// or 8-lane AVX2 intrinsics (whichever -march=native allows; the compiler's own vectors elsewhere), on
// threads of its own over the output rows. Per group g of an output row n:
//
//     out[m, n] += scale[n, g] * (q[n, g] . x[m, g]) + bias[n, g] * sum(x[m, g])
//
// the same sum as MLX's x . (scale * q + bias), in another order. Anything else (other bits, dtypes,
// transpose=False, another device) is MLX's quantized_matmul, unchanged; so are the gradients, jvp
// and vmap: the primitive hands them to MLX's QuantizedMatmul.

#include <sched.h>
#include <unistd.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace mx = mlx::core;
namespace nb = nanobind;

namespace {

#if defined(__AVX512F__)
constexpr int L = 16;  // lanes of a vector of floats
#elif defined(__AVX2__)
constexpr int L = 8;
#else
constexpr int L = 8;  // the compiler's own vectors, whatever the target has
#endif
typedef float vf __attribute__((vector_size(4 * L)));
constexpr int ROW_BLOCK = 4;  // rows of x that share one decoding of a weight row
constexpr int PREFETCH_ROWS = 4;  // weight rows read ahead

inline vf loadf(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// One output row's values as floats: Step<BITS>::values of them from w (a whole number of steps into
// the row), as Step<BITS>::values / L vectors. A uint32 holds 32 / BITS values, lowest bits first. Each
// step reads 4 bytes (2 bits: 16 values, each lane shifting its value down from one word) or 16 bytes
// (8 bits: 16 values, one byte a lane; 4 bits: 32 values, in the order of :func:`nibble_order`: the
// low nibbles of L bytes, then their high nibbles, so that a lane holds one byte and two masks split it),
// which a group of 32 or more always holds.
// Which of 32 consecutive 4-bit values (16 bytes) vector v = i / L, lane i % L of a step holds: byte
// b = (v / 2) * L + lane, its low nibble (value 2b) for even v, its high one (2b + 1) for odd v.
constexpr int nibble_order(int i) {
  return 2 * ((i / L / 2) * L + i % L) + (i / L) % 2;
}

template <int BITS>
struct Step {
  static constexpr int values = BITS == 4 ? 32 : 16;
  static void decode(const uint32_t* w, vf* q) {
#if defined(__AVX512F__)
    if constexpr (BITS == 2) {
      const __m512i shift = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
      __m512i v = _mm512_srlv_epi32(_mm512_set1_epi32(int(*w)), shift);
      q[0] = (vf)_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(3)));
    } else if constexpr (BITS == 4) {
      __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
      q[0] = (vf)_mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)));
      q[1] = (vf)_mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
    } else {
      q[0] = (vf)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
    }
#elif defined(__AVX2__)
    if constexpr (BITS == 2) {
      __m256i word = _mm256_set1_epi32(int(*w));
      const __m256i mask = _mm256_set1_epi32(3);
      const __m256i shift = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
      q[0] = (vf)_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(word, shift), mask));
      q[1] = (vf)_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(word, _mm256_add_epi32(shift, _mm256_set1_epi32(16))), mask));
    } else if constexpr (BITS == 4) {
      for (int j = 0; j < 2; j++) {
        __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + 2 * j)));
        q[2 * j] = (vf)_mm256_cvtepi32_ps(_mm256_and_si256(bytes, _mm256_set1_epi32(15)));
        q[2 * j + 1] = (vf)_mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
      }
    } else {
      for (int i = 0; i < 2; i++)
        q[i] = (vf)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + 2 * i))));
    }
#else
    constexpr int per = 32 / BITS;
    for (int i = 0; i < values; i++) {
      int at = BITS == 4 ? nibble_order(i) : i;  // the value lane i % L of vector i / L holds
      q[i / L][i % L] = float((w[at / per] >> (at % per * BITS)) & ((1u << BITS) - 1));
    }
#endif
  }
};

// A tree of sums (the compiler may not reorder a float loop's).
inline float hsum(vf v) {
  float lanes[L];
  std::memcpy(lanes, &v, sizeof lanes);
  for (int width = L / 2; width > 0; width /= 2)
    for (int i = 0; i < width; i++) lanes[i] += lanes[i + width];
  return lanes[0];
}

struct Problem {
  const float* x;       // [M, K], row-contiguous
  const float* xsum;    // [M, G]: each group's sum of x
  const uint32_t* w;    // [N, K * bits / 32]
  const float* scales;  // [N, G]
  const float* biases;  // [N, G]
  float* out;           // [M, N]
  int M, N, K, G;
};

// Output rows [n0, n1) for the MR rows of x from m0.
template <int BITS, int GS, int MR>
void rows(const Problem& p, int m0, int n0, int n1) {
  const int words = p.K * BITS / 32;
  const float* x = p.x + size_t(m0) * p.K;
  const float* xs = p.xsum + size_t(m0) * p.G;
  for (int n = n0; n < n1; n++) {
    const uint32_t* w = p.w + size_t(n) * words;
    const float* s = p.scales + size_t(n) * p.G;
    const float* b = p.biases + size_t(n) * p.G;
    if (n + PREFETCH_ROWS < n1) {  // the hardware's prefetcher alone reached ~19 GB/s of the ~37 there are
      const char* ahead = reinterpret_cast<const char*>(w + size_t(PREFETCH_ROWS) * words);
      for (int at = 0; at < words * 4; at += 64) __builtin_prefetch(ahead + at);
      __builtin_prefetch(s + size_t(PREFETCH_ROWS) * p.G);
      __builtin_prefetch(b + size_t(PREFETCH_ROWS) * p.G);
    }
    vf acc[MR] = {};
    float bias[MR] = {};
    for (int g = 0; g < p.G; g++) {
      vf part[MR] = {};
      for (int c = 0; c < GS; c += Step<BITS>::values) {
        const int k = g * GS + c;
        vf q[Step<BITS>::values / L];
        Step<BITS>::decode(w + k * BITS / 32, q);
        for (int i = 0; i < Step<BITS>::values / L; i++)
          for (int m = 0; m < MR; m++) part[m] += q[i] * loadf(x + size_t(m) * p.K + k + i * L);
      }
      for (int m = 0; m < MR; m++) {
        acc[m] += part[m] * s[g];
        bias[m] += b[g] * xs[size_t(m) * p.G + g];
      }
    }
    for (int m = 0; m < MR; m++) {
      p.out[size_t(m0 + m) * p.N + n] = hsum(acc[m]) + bias[m];
    }
  }
}

template <int BITS, int GS>
void tile(const Problem& p, int n0, int n1) {
  int m = 0;
  for (; m + ROW_BLOCK <= p.M; m += ROW_BLOCK) rows<BITS, GS, ROW_BLOCK>(p, m, n0, n1);
  switch (p.M - m) {
    case 3: rows<BITS, GS, 3>(p, m, n0, n1); break;
    case 2: rows<BITS, GS, 2>(p, m, n0, n1); break;
    case 1: rows<BITS, GS, 1>(p, m, n0, n1); break;
    default: break;
  }
}

using TileFn = void (*)(const Problem&, int, int);

template <int BITS>
TileFn tile_for_group(int gs) {
  switch (gs) {
    case 32: return tile<BITS, 32>;
    case 64: return tile<BITS, 64>;
    case 128: return tile<BITS, 128>;
    default: return nullptr;
  }
}

TileFn tile_for(int bits, int gs) {
  switch (bits) {
    case 2: return tile_for_group<2>(gs);
    case 4: return tile_for_group<4>(gs);
    case 8: return tile_for_group<8>(gs);
    default: return nullptr;
  }
}

// Threads of our own over tiles of output rows; the caller (MLX's CPU stream thread) takes tiles too.
// A worker joins a job only while it is posted, and the caller waits only for workers that joined: a
// worker that is not scheduled in time costs nothing (the caller does its tiles). Workers sleep between
// jobs rather than spin: on a machine with more threads than cores, a spinning worker was preempted
// holding a tile and the caller waited out its time slice (4-bit gemma-3-270m, 2 busy cores: 21 ms a
// token single-threaded, 29-52 with a spinning worker, 21-23 with a sleeping one). Rebuilt in a forked
// child (its threads are not there). MLX_PERSONA_QMATMUL_THREADS caps the threads (the caller's included).
class Pool {
 public:
  static Pool& get() {
    static std::mutex made;
    static Pool* pool = nullptr;
    static pid_t owner = 0;
    std::lock_guard<std::mutex> lock(made);
    if (pool == nullptr || owner != getpid()) {
      pool = new Pool();  // never freed: detached workers may outlive static destructors
      owner = getpid();
    }
    return *pool;
  }

  int size() const { return int(workers_) + 1; }

  // fn(ctx, t) for every t in [0, tasks), each once, on whichever threads come; returns when all are
  // done. A second caller while one runs (two CPU streams) does its tasks alone.
  void run(int tasks, void (*fn)(void*, int), void* ctx) {
    std::unique_lock<std::mutex> mine(running_, std::try_to_lock);
    if (workers_ == 0 || tasks < 2 || !mine.owns_lock()) {
      for (int t = 0; t < tasks; t++) fn(ctx, t);
      return;
    }
    Posted job{fn, ctx, tasks};
    {
      std::lock_guard<std::mutex> lock(mu_);
      posted_ = &job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    job.work();
    {
      std::lock_guard<std::mutex> lock(mu_);
      posted_ = nullptr;  // no one joins from here on
    }
    for (int spin = 0; job.joined.load(std::memory_order_acquire) != 0; spin++) {
      if (spin < 4096) relax();
      else std::this_thread::yield();  // the worker is not running: let it
    }
  }

 private:
  struct Posted {
    void (*fn)(void*, int);
    void* ctx;
    int tasks;
    std::atomic<int> next{0};
    std::atomic<int> joined{0};
    void work() {
      for (int t; (t = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) fn(ctx, t);
    }
  };

  Pool() {
    cpu_set_t set;
    int cpus = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
    if (const char* env = std::getenv("MLX_PERSONA_QMATMUL_THREADS"); env != nullptr && std::atoi(env) > 0)
      cpus = std::min(cpus, std::atoi(env));
    workers_ = unsigned(std::max(cpus, 1) - 1);
    for (unsigned i = 0; i < workers_; i++) std::thread([this] { loop(); }).detach();
  }

  static void relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      Posted* job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
        seen = generation_.load(std::memory_order_relaxed);
        job = posted_;
        if (job != nullptr) job->joined.fetch_add(1, std::memory_order_relaxed);
      }
      if (job != nullptr) {
        job->work();
        job->joined.fetch_sub(1, std::memory_order_release);
      }
    }
  }

  unsigned workers_ = 0;
  std::mutex running_;
  std::mutex mu_;  // guards posted_ and the sleep on cv_
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  Posted* posted_ = nullptr;
};

struct Job {
  Problem p;
  TileFn tile;
  int rows_per_task;
};

void run_task(void* ctx, int t) {
  auto* job = static_cast<Job*>(ctx);
  int n0 = t * job->rows_per_task;
  job->tile(job->p, n0, std::min(n0 + job->rows_per_task, job->p.N));
}

// x as [M, K] row-contiguous floats: x's own data when it is, else a copy into `copy`.
const float* rows_of(const mx::array& x, std::vector<float>& copy) {
  if (x.flags().row_contiguous) return x.data<float>();
  copy.resize(x.size());
  const float* base = x.data<float>();
  std::vector<int64_t> index(x.ndim(), 0);
  for (size_t i = 0; i < x.size(); i++) {
    int64_t at = 0;
    for (int d = 0; d < int(x.ndim()); d++) at += index[d] * x.strides()[d];
    copy[i] = base[at];
    for (int d = int(x.ndim()) - 1; d >= 0 && ++index[d] == x.shape(d); d--) index[d] = 0;
  }
  return copy.data();
}

void compute(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
             mx::array& out, int group_size, int bits) {
  std::vector<float> x_copy;
  Problem p;
  p.K = x.shape(-1);
  p.M = int(x.size() / std::max(p.K, 1));
  p.N = w.shape(0);
  p.G = p.K / group_size;
  p.x = rows_of(x, x_copy);
  std::vector<float> in_order;
  if (bits == 4) {  // x in the order the steps decode the weights in (nibble_order)
    in_order.resize(size_t(p.M) * p.K);
    for (size_t r = 0; r < size_t(p.M) * p.K; r += 32)
      for (int i = 0; i < 32; i++) in_order[r + i] = p.x[r + nibble_order(i)];
  }
  p.w = w.data<uint32_t>();
  p.scales = scales.data<float>();
  p.biases = biases.data<float>();
  p.out = out.data<float>();
  std::vector<float> xsum(size_t(p.M) * p.G);
  for (int m = 0; m < p.M; m++)
    for (int g = 0; g < p.G; g++) {
      float s = 0;
      for (int k = 0; k < group_size; k++) s += p.x[size_t(m) * p.K + g * group_size + k];
      xsum[size_t(m) * p.G + g] = s;
    }
  p.xsum = xsum.data();
  if (bits == 4) p.x = in_order.data();
  Pool& pool = Pool::get();
  // ~64K weights per task: enough to pay for handing it over, small enough to share a layer out.
  int per = std::max(1, (1 << 16) / std::max(p.K, 1));
  if (int64_t(p.N) * p.K < (1 << 18)) per = p.N;  // a small product (~20 us): no threads
  per = std::min(per, (p.N + pool.size() - 1) / pool.size());
  Job job{p, tile_for(bits, group_size), std::max(per, 1)};
  pool.run((p.N + job.rows_per_task - 1) / job.rows_per_task, run_task, &job);
}

bool contiguous_or_unknown(const mx::array& a) {
  return !a.is_available() || a.flags().row_contiguous;
}

mx::array reference(const std::vector<mx::array>& in, int group_size, int bits, mx::StreamOrDevice s = {}) {
  return mx::quantized_matmul(in[0], in[1], in[2], in[3], true, group_size, bits, "affine", s);
}

class FastQuantizedMatmul : public mx::UnaryPrimitive {
 public:
  FastQuantizedMatmul(mx::Stream s, int group_size, int bits)
      : mx::UnaryPrimitive(s), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (auto& a : in) encoder.set_input_array(a);
    encoder.set_output_array(out);
    if (!in[1].flags().row_contiguous || !in[2].flags().row_contiguous || !in[3].flags().row_contiguous)
      throw std::invalid_argument("[FastQuantizedMatmul] w, scales and biases must be row-contiguous");
    encoder.dispatch([x = in[0], w = in[1], s = in[2], b = in[3], out, gs = group_size_, bits = bits_]() mutable {
      compute(x, w, s, b, out, gs, bits);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[FastQuantizedMatmul] CPU only");
  }

  // Gradients, jvp and vmap are MLX's QuantizedMatmul's on the same inputs.
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    auto ref = reference(primals, group_size_, bits_, stream());
    return ref.primitive().vjp(primals, cotangents, argnums, {ref});
  }

  std::vector<mx::array> jvp(const std::vector<mx::array>& primals, const std::vector<mx::array>& tangents,
                             const std::vector<int>& argnums) override {
    return reference(primals, group_size_, bits_, stream()).primitive().jvp(primals, tangents, argnums);
  }

  std::pair<std::vector<mx::array>, std::vector<int>> vmap(const std::vector<mx::array>& inputs,
                                                           const std::vector<int>& axes) override {
    return reference(inputs, group_size_, bits_, stream()).primitive().vmap(inputs, axes);
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    auto shape = in[0].shape();
    shape.back() = in[1].shape(0);
    return {shape};
  }

  const char* name() const override { return "FastQuantizedMatmul"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const FastQuantizedMatmul&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_;
  }

 private:
  int group_size_;
  int bits_;
};

// Why the kernel does not take this product (nullptr: it does).
const char* refusal(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
                    int group_size, int bits, int max_rows) {
  if (mx::to_stream({}).device != mx::Device::cpu) return "the default device is not the CPU";
  if (tile_for(bits, group_size) == nullptr) return "bits other than 2, 4, 8 or a group size other than 32, 64, 128";
  if (x.dtype() != mx::float32 || scales.dtype() != mx::float32 || biases.dtype() != mx::float32)
    return "x, scales and biases must be float32";
  if (w.dtype() != mx::uint32 || w.ndim() != 2 || scales.ndim() != 2 || biases.ndim() != 2 || x.ndim() < 1)
    return "w must be a 2-D uint32 matrix";
  int K = x.shape(-1), N = w.shape(0);
  if (K == 0 || K % group_size != 0 || int64_t(w.shape(1)) * 32 != int64_t(K) * bits ||
      scales.shape() != mx::Shape{N, K / group_size} || biases.shape() != scales.shape())
    return "shapes that do not match";
  if (int64_t(x.size() / K) > max_rows) return "more rows of x than the kernel takes";
  if (!contiguous_or_unknown(w) || !contiguous_or_unknown(scales) || !contiguous_or_unknown(biases))
    return "w, scales or biases not row-contiguous";
  return nullptr;
}

mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits, int max_rows) {
  if (refusal(x, w, scales, biases, group_size, bits, max_rows) != nullptr)
    return reference({x, w, scales, biases}, group_size, bits);
  auto shape = x.shape();
  shape.back() = w.shape(0);
  auto s = mx::to_stream({});  // the CPU stream in use (mlx-lm generates on a stream of its own)
  return mx::array(shape, mx::float32, std::make_shared<FastQuantizedMatmul>(s, group_size, bits),
                   {x, w, scales, biases});
}

}  // namespace

NB_MODULE(mlx_persona_qmatmul, m) {
  m.doc() = "x @ dequantize(w).T on the CPU for MLX's affine quantization (mlx_persona.backend.qmatmul)";
  m.def("quantized_matmul", &quantized_matmul, nb::arg("x"), nb::arg("w"), nb::arg("scales"), nb::arg("biases"),
        nb::arg("group_size"), nb::arg("bits"), nb::arg("max_rows"),
        "The product, or MLX's mx.quantized_matmul(transpose=True) where the kernel does not take it.");
  m.def(
      "refusal",
      [](const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases, int group_size,
         int bits, int max_rows) -> std::optional<std::string> {
        const char* why = refusal(x, w, scales, biases, group_size, bits, max_rows);
        return why ? std::optional<std::string>(why) : std::nullopt;
      },
      nb::arg("x"), nb::arg("w"), nb::arg("scales"), nb::arg("biases"), nb::arg("group_size"), nb::arg("bits"),
      nb::arg("max_rows"), "Why quantized_matmul would hand this product to MLX (None: it would not).");
  m.def("threads", [] { return Pool::get().size(); }, "Threads the kernel runs on (the caller's included).");
}
