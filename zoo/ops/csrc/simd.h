// Shared by the native CPU kernels (attention.cc, gibbs.cc): float vectors through GCC vector
// extensions (AVX-512 where the compiler targets it, else 8 floats), exp, one register-blocked
// GEMM micro-kernel and its driver, and a parallel for over a pool of threads. Everything but
// the pool is in an anonymous namespace: each kernel file gets its own copy.

#pragma once

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int VW = 16;  // floats per vector
#else
constexpr int VW = 8;
#endif
typedef float vf __attribute__((vector_size(VW * 4), aligned(4)));  // aligned(4): unaligned loads
typedef int32_t vi __attribute__((vector_size(VW * 4), aligned(4)));

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline vf load(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline void store(float* p, vf x) { *reinterpret_cast<vf*>(p) = x; }
inline vf splat(float x) {  // one vbroadcastss (GCC makes vf{} + x an add of 0.0f, then the broadcast)
#if defined(__AVX512F__)
  return reinterpret_cast<vf>(_mm512_set1_ps(x));
#elif defined(__AVX__)
  return reinterpret_cast<vf>(_mm256_set1_ps(x));
#else
  vf r;
  for (int i = 0; i < VW; ++i) r[i] = x;
  return r;
#endif
}

// max(a, b) or min(a, b), b where either is NaN (so a NaN in b passes through): one vmaxps /
// vminps where there is one.
template <bool Max>
inline vf vminmax(vf a, vf b) {
#if defined(__AVX512F__)
  const __m512 x = reinterpret_cast<__m512>(a), y = reinterpret_cast<__m512>(b);
  return reinterpret_cast<vf>(Max ? _mm512_max_ps(x, y) : _mm512_min_ps(x, y));
#elif defined(__AVX__)
  const __m256 x = reinterpret_cast<__m256>(a), y = reinterpret_cast<__m256>(b);
  return reinterpret_cast<vf>(Max ? _mm256_max_ps(x, y) : _mm256_min_ps(x, y));
#else
  return Max ? (a > b ? a : b) : (a < b ? a : b);
#endif
}
inline vf vmax(vf a, vf b) { return vminmax<true>(a, b); }
inline vf vmin(vf a, vf b) { return vminmax<false>(a, b); }

// exp(x): n = round(x / ln2), f = x - n ln2 in two parts, exp(f) by Taylor to degree 6 on
// |f| <= ln2 / 2, times 2^n. With AVX-512: n by vrndscaleps, 2^n by vscalefps (overflow to
// +inf), and x < -87 (-inf included) gives exactly 0 (the true value is under 1.7e-38, about
// float32's smallest normal; no denormal is ever made); NaN stays NaN; 12 instructions.
// Otherwise the 1.5 * 2^23 rounding trick and 2^n built from n's bits, for x <= 88: x is clamped
// at -87.9, where n = -127, whose bit pattern is 0.0, so from about -87.3 down the result is 0.
inline vf exp_poly(vf f) {
  vf p = splat(1.0f / 720);
  p = p * f + 1.0f / 120;
  p = p * f + 1.0f / 24;
  p = p * f + 1.0f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  return p * f + 1.0f;
}

inline vf vexp(vf x) {
#if defined(__AVX512F__)
  const __m512 xx = reinterpret_cast<__m512>(x);
  const vf n = reinterpret_cast<vf>(_mm512_roundscale_ps(_mm512_mul_ps(xx, _mm512_set1_ps(1.44269504088896341f)),
                                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const vf f = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  const __mmask16 keep = _mm512_cmp_ps_mask(xx, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ);  // x >= -87 or NaN
  return reinterpret_cast<vf>(_mm512_maskz_scalef_ps(keep, reinterpret_cast<__m512>(exp_poly(f)),
                                                     reinterpret_cast<__m512>(n)));
#else
  x = vmax(splat(-87.9f), x);  // then n >= -127
  const vf magic = splat(12582912.0f);
  vf n = (x * 1.44269504088896341f + magic) - magic;
  vf f = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  return exp_poly(f) * reinterpret_cast<vf&>(bits);
#endif
}

inline float hmax(vf x) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps(reinterpret_cast<__m512>(x));
#else
  float m = x[0];
  for (int i = 1; i < VW; ++i) m = std::max(m, x[i]);
  return m;
#endif
}

inline float hsum(vf x) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(x));
#else
  float s = 0;
  for (int i = 0; i < VW; ++i) s += x[i];
  return s;
#endif
}

// c[MR x NV*VW] (= or +=, rows first scaled by rs[r] when rs) a @ b over kd: a(i, k) =
// a[i * sai + k * sak], b row k at b + k * ldb, c row i at c + i * ldc.
template <int MR, int NV>
inline void tile(int64_t kd, const float* a, int64_t sai, int64_t sak, const float* b,
                 int64_t ldb, float* c, int64_t ldc, bool accumulate, const float* rs) {
  vf acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = accumulate ? load(c + r * ldc + v * VW) : vf{};
      if (rs) acc[r][v] *= rs[r];
    }
  for (int64_t k = 0; k < kd; ++k) {
    vf bv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) bv[v] = load(b + k * ldb + v * VW);
    const float* ak = a + k * sak;
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      vf s = splat(ak[r * sai]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] += s * bv[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) store(c + r * ldc + v * VW, acc[r][v]);
}

// tile<mr, NV> for a runtime mr < MR (the rows left over after whole register tiles).
template <int MR, int NV>
inline void tile_rows(int mr, int64_t kd, const float* a, int64_t sai, int64_t sak, const float* b,
                      int64_t ldb, float* c, int64_t ldc, bool accumulate, const float* rs) {
  if constexpr (MR > 1) {
    if (mr == MR - 1) return tile<MR - 1, NV>(kd, a, sai, sak, b, ldb, c, ldc, accumulate, rs);
    return tile_rows<MR - 1, NV>(mr, kd, a, sai, sak, b, ldb, c, ldc, accumulate, rs);
  }
}

// c[m x n] (= or +=) a[m x kd] @ b[kd x n] with the strides of tile(); n % VW == 0. Loops:
// chunks of KC along kd (so the rows of b in use stay in L1), then column panels (one panel of
// b, reused by every row block), then row blocks. Rows first and no chunks, as at first, the
// forward ran at 91 GFLOP/s on one core (S4096, B1 N8 D64); this way 97, and on two cores
// 189 -> 218; KC 64 and 256 were no better.
constexpr int64_t KC = 128;

template <int MR, int NV>
void gemm(int64_t m, int64_t n, int64_t kd, const float* a, int64_t sai, int64_t sak,
          const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate,
          const float* rs = nullptr) {
  const int64_t wide = n / (NV * VW) * (NV * VW);
  const int64_t chunks = std::max<int64_t>(1, (kd + KC - 1) / KC);  // kd = 0: c = 0, or rs * c
  for (int64_t k0 = 0; k0 < chunks * KC; k0 += KC) {
    const int64_t kc = std::max<int64_t>(0, std::min(KC, kd - k0));
    const bool acc = accumulate || k0 > 0;
    const float* rk = k0 == 0 ? rs : nullptr;  // rows scaled once, before the first chunk
    const float* ak = a + k0 * sak;
    const float* bk = b + k0 * ldb;
    for (int64_t j = 0; j < n; j += (j < wide ? NV * VW : VW)) {
      for (int64_t i = 0; i < m; i += MR) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, m - i));
        const float* ai = ak + i * sai;
        float* cij = c + i * ldc + j;
        const float* ri = rk ? rk + i : nullptr;
        if (j < wide) {
          if (mr == MR) tile<MR, NV>(kc, ai, sai, sak, bk + j, ldb, cij, ldc, acc, ri);
          else tile_rows<MR, NV>(mr, kc, ai, sai, sak, bk + j, ldb, cij, ldc, acc, ri);
        } else {
          if (mr == MR) tile<MR, 1>(kc, ai, sai, sak, bk + j, ldb, cij, ldc, acc, ri);
          else tile_rows<MR, 1>(mr, kc, ai, sai, sak, bk + j, ldb, cij, ldc, acc, ri);
        }
      }
    }
  }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && \
    defined(__linux__)
#define ZOO_AMX 1
// Intel AMX: C [16 x 16] float32 += A [16 x 32] bf16 @ B [32 x 16] bf16 per instruction (B in
// the "VNNI" layout: 16 rows of k pairs, [16 columns][2]), about 8x the FMA units' rate.
bool amx_permitted() {  // Linux lends the AMX tile state to a process that asks (kernel >= 5.16)
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                 18 /* XFEATURE_XTILEDATA */) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void configure_tiles() {  // all 8 tiles 16 rows x 64 bytes; per thread
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
}
#else
#define ZOO_AMX 0
bool amx_permitted() { return false; }
#endif

// A kernel's AMX path runs where the CPU, the OS and the build allow it, unless ZOO_NATIVE_AMX=0.
bool amx_enabled() {
  const char* env = std::getenv("ZOO_NATIVE_AMX");
  return amx_permitted() && !(env && std::string(env) == "0");
}

int num_threads() {
  if (const char* env = std::getenv("ZOO_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

// body(task, worker) for task in [0, n) on up to num_threads() threads (the caller's one), in a
// fresh std::thread for each helper: what parallel_for falls back to where the pool is busy.
template <class Body>
void parallel_for_spawned(int64_t n, int nt, Body& body) {
  std::atomic<int64_t> next{0};
  auto work = [&](int worker) {
    for (int64_t i; (i = next.fetch_add(1)) < n;) body(i, worker);
  };
  std::vector<std::thread> threads;
  try {
    for (int w = 1; w < nt; ++w) threads.emplace_back(work, w);
  } catch (const std::system_error&) {  // no more threads to be had: fewer do the work
  }
  work(0);
  for (auto& t : threads) t.join();
}

}  // namespace

// One pool of helper threads per process (shared by every kernel file: not in the anonymous
// namespace; built on the first parallel call, never torn down). A call publishes its job; the
// helpers that wake in time each take a worker slot and pull tasks until none is left; the
// caller works too, then closes the job and waits only for the helpers that joined it. Between
// jobs a helper spins for ZOO_NATIVE_SPIN_US microseconds (default 1000) before it sleeps, as
// OpenMP's and Eigen's pools do: a thread made afresh for each call (as before) starts on a
// core that has gone idle, and on the 2-core CPU machines about half the calls of the S1024
// forward (13 ms) then ran at one core's speed (85 vs 165 GFLOP/s, benchmarks/results/README.md).
namespace zoo_native {

class Pool {
 public:
  static Pool& get() {
    static const bool once = (pthread_atfork(nullptr, nullptr, [] { instance() = new Pool(); }), true);
    (void)once;
    return *instance();
  }

  // False (nothing run) where another job holds the pool: a concurrent call (XLA runs one per
  // emulated device) or a nested one; the caller then spawns its own threads.
  template <class Body>
  bool run(int64_t n, int nt, Body& body) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    start_helpers(nt - 1);
    body_ = &body;
    call_ = [](void* b, int64_t i, int w) { (*static_cast<Body*>(b))(i, w); };
    n_ = n;
    next_.store(0, std::memory_order_relaxed);
    finished_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (job_.load(std::memory_order_relaxed) >> 32) + 1;
    max_helpers_.store(nt - 1, std::memory_order_relaxed);
    job_.store(gen << 32, std::memory_order_release);  // open: generation gen, no helper joined yet
    {
      std::lock_guard<std::mutex> lock(sleep_);
    }
    wake_.notify_all();
    work(0);
    const uint64_t closed = job_.exchange((gen << 32) | CLOSED, std::memory_order_acq_rel);
    const uint32_t joined = static_cast<uint32_t>(closed & 0xffffffffu);
    // the joined helpers' last tasks: spin a little, then yield (on an oversubscribed machine a
    // helper may be waiting for this core)
    for (int k = 0; finished_.load(std::memory_order_acquire) < joined; ++k) {
      if (k < 1024) pause();
      else std::this_thread::yield();
    }
    return true;
  }

 private:
  static constexpr uint64_t CLOSED = 0xffffffffu;

  // Leaked on purpose (helpers may still be asleep at exit); a forked child, which has none of
  // the helpers and maybe a lock held by one of them, gets a new pool.
  static Pool*& instance() {
    static Pool* pool = new Pool();
    return pool;
  }

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#endif
  }

  static int64_t spin_us() {
    const char* env = std::getenv("ZOO_NATIVE_SPIN_US");
    return env ? std::max<int64_t>(0, std::atoll(env)) : 1000;
  }

  void work(int worker) {
    for (int64_t i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < n_;) call_(body_, i, worker);
  }

  void start_helpers(int want) {  // under busy_
    try {
      while (static_cast<int>(helpers_.size()) < want) {
        helpers_.emplace_back([this] { helper(); });
        helpers_.back().detach();
      }
    } catch (const std::system_error&) {  // no more threads to be had: fewer do the work
    }
  }

  // Join the open job of generation gen: a worker slot (1, 2, ...), or 0 where it is closed,
  // full or already another generation's.
  int join(uint64_t gen) {
    uint64_t cur = job_.load(std::memory_order_acquire);
    while ((cur >> 32) == gen && (cur & 0xffffffffu) < static_cast<uint64_t>(max_helpers_.load(std::memory_order_relaxed))) {
      if (job_.compare_exchange_weak(cur, cur + 1, std::memory_order_acq_rel)) return static_cast<int>((cur & 0xffffffffu) + 1);
    }
    return 0;
  }

  void helper() {
    uint64_t seen = job_.load(std::memory_order_acquire) >> 32;
    for (;;) {
      uint64_t gen = job_.load(std::memory_order_acquire) >> 32;
      if (gen == seen) {  // the variable read each time (~0.1 us): a process can change it
        const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us());
        for (int k = 0; (gen = job_.load(std::memory_order_acquire) >> 32) == seen; ++k) {
          if ((k & 255) == 255 && std::chrono::steady_clock::now() >= until) break;
          pause();
        }
      }
      if (gen == seen) {
        std::unique_lock<std::mutex> lock(sleep_);
        wake_.wait(lock, [&] { return (job_.load(std::memory_order_acquire) >> 32) != seen; });
        gen = job_.load(std::memory_order_acquire) >> 32;
      }
      seen = gen;
      if (const int slot = join(gen)) {
        work(slot);
        finished_.fetch_add(1, std::memory_order_release);
      }
    }
  }

  std::mutex busy_;    // held by the job running
  std::mutex sleep_;   // the helpers' sleep
  std::condition_variable wake_;
  std::vector<std::thread> helpers_;
  std::atomic<uint64_t> job_{0};  // generation << 32 | helpers joined (CLOSED: closed)
  std::atomic<int64_t> next_{0};
  std::atomic<uint32_t> finished_{0};
  int64_t n_ = 0;
  std::atomic<int> max_helpers_{0};
  void* body_ = nullptr;
  void (*call_)(void*, int64_t, int) = nullptr;
};

// Whether this thread is running a parallel_for's task (one flag for every kernel and Body).
inline bool& in_task() {
  static thread_local bool inside = false;
  return inside;
}

}  // namespace zoo_native

namespace {

// body(task, worker) for task in [0, n), on up to num_threads() threads (the caller's one):
// worker in [0, that count), each worker's tasks one after another.
// A call from inside a task runs serially on its thread.
template <class Body>
void parallel_for(int64_t n, Body body) {
  const int nt = zoo_native::in_task() ? 1 : static_cast<int>(std::min<int64_t>(n, num_threads()));
  if (nt <= 1) {
    for (int64_t i = 0; i < n; ++i) body(i, 0);
    return;
  }
  // An exception in a task (std::bad_alloc, say) skips the tasks not yet started and is thrown
  // again here, on the caller's thread, once every worker is done: XLA's FFI turns it into an
  // error for Python (one in a helper thread would have ended the process).
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  auto task = [&](int64_t i, int worker) {
    if (failed.load(std::memory_order_relaxed)) return;
    bool& inside = zoo_native::in_task();  // this thread's flag
    const bool was = inside;
    inside = true;
    try {
      body(i, worker);
    } catch (...) {
      if (!failed.exchange(true)) error = std::current_exception();
    }
    inside = was;
  };
  if (!zoo_native::Pool::get().run(n, nt, task)) parallel_for_spawned(n, nt, task);
  if (error) std::rethrow_exception(error);
}

}  // namespace
