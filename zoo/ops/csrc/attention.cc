// FlashAttention for the CPU, forward and backward, as XLA FFI custom calls (float32; and
// bfloat16 entry points that run on Intel AMX tiles where the CPU has them, below).
//
// zoo.ops.native compiles this file on first use with the machine's C++ compiler (-O3
// -march=native) and registers the two handlers with jax.ffi. Layouts are the zoo's:
// q [B, T, N, D], k and v [B, S, K, D] (N % K == 0, G = N / K query heads per kv head),
// o [B, T, N, D], lse [B, K, T, G] (the logsumexp of each query row over its visible keys,
// +inf where it sees none). Key j is visible from query position t when
// t - window_left <= j <= t + window_right (a negative bound is open), j <= t if causal, j < S,
// and, with has_mask, mask[b, n, t, j] (bool [B, N|1, T|1, S|1], read with its broadcast strides).
// With has_bias, bias[b, n, t, j] (float32 [B|1, N|1, T|1, S|1], likewise) is added to the logits
// (after the scale), and the backward returns its gradient summed over what each (batch, kv head)
// task sees of its broadcast axes: dbias [B, K, G|1, T|1, S|1] (summed over B and K by the caller
// where the bias broadcasts there).
//
// Work is split into tasks that own their outputs, run by a few std::threads per call:
// forward, one task per (batch, kv head, block of query positions), its G heads' rows
// together (they share k and v); backward, one task per (batch, kv head), which owns its dk,
// dv and dq. Within a task everything is tiles of at most (rows x block_k) floats that stay in
// the core's L2, multiplied by one register-blocked micro-kernel (GCC vector extensions: AVX-512
// where the compiler targets it, else narrower vectors), with exp by Cody-Waite range reduction
// and a degree-6 polynomial (relative error < 3e-7; exp(-inf) = 0 exactly).

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t COL_ALIGN = 32;  // tiles start and end on multiples of this many keys (>= 2 VW)

// Register tiles (accumulators MR x NV vectors): wide-and-short for q k^T (its n is a tile's
// keys), tall for products whose n is the head dim.
#if defined(__AVX512F__)
constexpr int MR_KEYS = 8, NV_KEYS = 2, MR_DIM = 6, NV_DIM = 4;  // 12 or 14 x 2: no faster
#else
constexpr int MR_KEYS = 6, NV_KEYS = 2, MR_DIM = 3, NV_DIM = 4;
#endif

void gemm_keys(int64_t m, int64_t n, int64_t kd, const float* a, int64_t sai, int64_t sak,
               const float* b, int64_t ldb, float* c, int64_t ldc) {
  gemm<MR_KEYS, NV_KEYS>(m, n, kd, a, sai, sak, b, ldb, c, ldc, false);
}

void gemm_dim(int64_t m, int64_t n, int64_t kd, const float* a, int64_t sai, int64_t sak,
              const float* b, int64_t ldb, float* c, int64_t ldc, const float* rs = nullptr) {
  gemm<MR_DIM, NV_DIM>(m, n, kd, a, sai, sak, b, ldb, c, ldc, true, rs);
}

struct Problem {
  int64_t B, T, N, S, K, D, G;
  bool causal;
  int64_t wl, wr;  // window (left, right); negative: open
  float scale;
  int64_t rows;      // query rows (positions x G, about) per forward task / backward step
  int64_t kv_block;  // keys per tile, a multiple of COL_ALIGN
  int64_t Sp;      // S rounded up to COL_ALIGN
  int64_t Dp;      // D rounded up to 32 (the bf16 AMX tiles' depth)
  const bool* mask = nullptr;  // [B, N|1, T|1, S|1], True = attend; null: none
  int64_t msb = 0, msn = 0, mst = 0, mss = 0;  // its strides (0 along a broadcast axis)
  const float* bias = nullptr;  // [B|1, N|1, T|1, S|1]; null: none
  int64_t bsb = 0, bsn = 0, bst = 0, bss = 0;  // its strides
  int64_t dbg = 0, dbt = 0, dbs = 0;  // the extents of dbias's last three axes: G|1, T|1, S|1
  int64_t ldt;     // row stride of k^T and v^T packs: Sp + 16, an odd number of 64-byte lines, so
                   // a tile's rows do not all fall in a few L1 sets (1.5x on q k^T at S4096)

  int64_t lo(int64_t t) const { return wl >= 0 ? std::max<int64_t>(0, t - wl) : 0; }
  int64_t hi(int64_t t) const {  // inclusive; < lo(t) where t sees no key
    int64_t h = S - 1;
    if (wr >= 0) h = std::min(h, t + wr);
    if (causal) h = std::min(h, t);
    return h;
  }
  template <class T>
  const T* row(const T* x, int64_t b, int64_t t, int64_t n, int64_t heads, int64_t len) const {
    return x + ((b * len + t) * heads + n) * D;
  }
};

// The key tiles [k0, k0 + w) that positions [t0, t1) see, w a multiple of COL_ALIGN (keys past
// S are zero padding, masked), and whether a tile needs a mask.
template <class Fn>
void for_key_tiles(const Problem& p, int64_t t0, int64_t t1, Fn fn) {
  int64_t first = p.S, last = -1;
  for (int64_t t = t0; t < t1; ++t)
    if (p.lo(t) <= p.hi(t)) first = std::min(first, p.lo(t)), last = std::max(last, p.hi(t));
  if (first > last) return;
  for (int64_t k0 = first / COL_ALIGN * COL_ALIGN; k0 <= last; k0 += p.kv_block) {
    const int64_t end = std::min(k0 + p.kv_block, last + 1);
    const int64_t w = (end - k0 + COL_ALIGN - 1) / COL_ALIGN * COL_ALIGN;
    const bool whole = p.lo(t1 - 1) <= k0 && k0 + w - 1 <= p.hi(t0) && !p.mask;
    fn(k0, w, !whole);
  }
}

// -inf where row r (position t0 + r / G, head h * G + r % G of batch b) does not see key k0 + j.
void mask_tile(const Problem& p, float* s, int64_t rows, int64_t b, int64_t h, int64_t t0, int64_t k0,
               int64_t w, int64_t ld = 0, int64_t r0 = 0) {  // ld: s's row stride (0: w); rows [r0, rows)
  ld = ld ? ld : w;
  for (int64_t r = r0; r < rows; ++r) {
    const int64_t t = t0 + r / p.G;
    const int64_t lo = std::clamp<int64_t>(p.lo(t) - k0, 0, w);
    const int64_t hi = std::clamp<int64_t>(p.hi(t) + 1 - k0, lo, w);
    float* sr = s + r * ld;
    std::fill(sr, sr + lo, NEG_INF);
    std::fill(sr + hi, sr + w, NEG_INF);
    if (p.mask) {
      const bool* m = p.mask + b * p.msb + (h * p.G + r % p.G) * p.msn + t * p.mst + k0 * p.mss;
      for (int64_t j = lo; j < hi; ++j) sr[j] = m[j * p.mss] ? sr[j] : NEG_INF;
    }
  }
}

// s[r, j] += bias[b, head of row r, position of row r, k0 + j] for the tile's keys below S.
void add_bias(const Problem& p, float* s, int64_t rows, int64_t b, int64_t h, int64_t t0, int64_t k0,
              int64_t w, int64_t ld = 0, int64_t r0 = 0) {  // ld: s's row stride (0: w); rows [r0, rows)
  ld = ld ? ld : w;
  const int64_t valid = std::min(w, p.S - k0);
  for (int64_t r = r0; r < rows; ++r) {
    const float* x = p.bias + b * p.bsb + (h * p.G + r % p.G) * p.bsn + (t0 + r / p.G) * p.bst + k0 * p.bss;
    float* sr = s + r * ld;
    if (p.bss) {
      for (int64_t j = 0; j < valid; ++j) sr[j] += x[j];
    } else {
      for (int64_t j = 0; j < valid; ++j) sr[j] += x[0];
    }
  }
}

// The rows' share of dbias: db [G|1, T|1, S|1] of task (b, h) += ds over the tile's keys below S
// (summed over the axes the bias broadcasts along).
void add_dbias(const Problem& p, const float* ds, int64_t rows, int64_t t0, int64_t k0, int64_t w,
               float* db, int64_t ld = 0) {  // ld: ds's row stride (0: w)
  ld = ld ? ld : w;
  const int64_t valid = std::min(w, p.S - k0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = p.dbg > 1 ? r % p.G : 0, t = p.dbt > 1 ? t0 + r / p.G : 0;
    float* out = db + (g * p.dbt + t) * p.dbs;
    const float* x = ds + r * ld;
    if (p.dbs > 1) {
      for (int64_t j = 0; j < valid; ++j) out[k0 + j] += x[j];
    } else {
      float acc = 0;
      for (int64_t j = 0; j < valid; ++j) acc += x[j];
      out[0] += acc;
    }
  }
}

#if defined(__AVX512F__)
// r[0..16) (16 rows of 16 floats) transposed in registers: unpack pairs of rows, gather 4-row
// groups per 128-bit lane, then move the lanes.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + k], lane L: rows 4i..4i+3 at column 4L + k
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    const __m512 x0 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88), x1 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);
    const __m512 y0 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88),
                 y1 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
    t[k] = _mm512_shuffle_f32x4(x0, y0, 0x88);       // column k
    t[8 + k] = _mm512_shuffle_f32x4(x0, y0, 0xDD);   // column 8 + k
    t[4 + k] = _mm512_shuffle_f32x4(x1, y1, 0x88);   // column 4 + k
    t[12 + k] = _mm512_shuffle_f32x4(x1, y1, 0xDD);  // column 12 + k
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}
#endif

// x^T of kv head (b, h) of x [B, S, K, D] packed as [D, ldt], zero from S to Sp. With AVX-512,
// blocks of 16 keys x 16 dims are transposed in registers (one element at a time, this pack was
// ~4% of an S1024 forward or forward + backward).
void pack_transposed(const Problem& p, const float* x, int64_t b, int64_t h, float* out) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= p.S; j += 16)
    for (int64_t d0 = 0; d0 < p.D; d0 += 16) {  // D is a multiple of VW = 16
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(p.row(x, b, j + i, h, p.K, p.S) + d0);
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(out + (d0 + i) * p.ldt + j, r[i]);
    }
#endif
  for (; j < p.S; ++j) {
    const float* xj = p.row(x, b, j, h, p.K, p.S);
    for (int64_t d = 0; d < p.D; ++d) out[d * p.ldt + j] = xj[d];
  }
  for (int64_t d = 0; d < p.D; ++d) std::fill(out + d * p.ldt + p.S, out + d * p.ldt + p.Sp, 0.0f);
}

// Kv head (b, h) of x [B, S, K, D] as contiguous rows [S, D] (its rows are K * D apart in x).
void pack_rows(const Problem& p, const float* x, int64_t b, int64_t h, float* out) {
  for (int64_t j = 0; j < p.S; ++j) std::memcpy(out + j * p.D, p.row(x, b, j, h, p.K, p.S), p.D * 4);
}

// Rows [t0, t1) x G of the kv head (b, h) of x [B, T, N, D] into out [rows, D], times mult.
void gather_rows(const Problem& p, const float* x, int64_t b, int64_t h, int64_t t0, int64_t t1,
                 float mult, float* out) {
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t g = 0; g < p.G; ++g) {
      const float* src = p.row(x, b, t, h * p.G + g, p.N, p.T);
      float* dst = out + ((t - t0) * p.G + g) * p.D;
      for (int64_t d = 0; d < p.D; ++d) dst[d] = src[d] * mult;
    }
}

void forward(const Problem& p, const float* q, const float* k, const float* v, float* o, float* lse) {
  // not zeroed: the packs write all that is read (columns past Sp of kT never are)
  std::unique_ptr<float[]> kT(new float[p.B * p.K * p.D * p.ldt]), vp(new float[p.B * p.K * p.S * p.D]);
  parallel_for(p.B * p.K, [&](int64_t bh, int) {
    pack_transposed(p, k, bh / p.K, bh % p.K, kT.get() + bh * p.D * p.ldt);
    pack_rows(p, v, bh / p.K, bh % p.K, vp.get() + bh * p.S * p.D);
  });
  const int64_t tq = std::max<int64_t>(1, p.rows / p.G);  // positions per task
  const int64_t nq = (p.T + tq - 1) / tq;
  const int nt = num_threads();
  const int64_t R = tq * p.G;
  std::vector<std::vector<float>> scratch(nt);
  // the last query blocks first: under a causal mask they see the most keys
  parallel_for(p.B * p.K * nq, [&](int64_t task, int worker) {
    const int64_t bh = task % (p.B * p.K), b = bh / p.K, h = bh % p.K;
    const int64_t t0 = (nq - 1 - task / (p.B * p.K)) * tq, t1 = std::min(p.T, t0 + tq);
    const int64_t rows = (t1 - t0) * p.G;
    std::vector<float>& buf = scratch[worker];
    buf.resize(R * p.D * 2 + R * p.kv_block + R * 3);
    float *qb = buf.data(), *acc = qb + R * p.D, *s = acc + R * p.D, *m = s + R * p.kv_block,
          *l = m + R, *alpha = l + R;
    gather_rows(p, q, b, h, t0, t1, p.scale, qb);
    std::fill(acc, acc + rows * p.D, 0.0f);
    std::fill(m, m + rows, NEG_INF);
    std::fill(l, l + rows, 0.0f);
    const float* kTh = kT.get() + bh * p.D * p.ldt;
    for_key_tiles(p, t0, t1, [&](int64_t k0, int64_t w, bool masked) {
      gemm_keys(rows, w, p.D, qb, p.D, 1, kTh + k0, p.ldt, s, w);
      if (p.bias) add_bias(p, s, rows, b, h, t0, k0, w);
      if (masked) mask_tile(p, s, rows, b, h, t0, k0, w);
      for (int64_t r = 0; r < rows; ++r) {
        float* sr = s + r * w;
        vf mx = splat(NEG_INF);
        for (int64_t j = 0; j < w; j += VW) mx = vmax(mx, load(sr + j));  // a NaN logit: m = NaN
        const float m_new = std::max(m[r], hmax(mx));
        if (m_new == NEG_INF) {  // nothing visible yet: p = 0
          std::fill(sr, sr + w, 0.0f);
          alpha[r] = 1.0f;
          continue;
        }
        vf sum0{}, sum1{};  // two chains: ~8% faster than one
        const vf mv = splat(m_new);
        for (int64_t j = 0; j < w; j += 2 * VW) {  // w is a multiple of COL_ALIGN = 32
          vf e0 = vexp(load(sr + j) - mv), e1 = vexp(load(sr + j + VW) - mv);
          store(sr + j, e0);
          store(sr + j + VW, e1);
          sum0 += e0;
          sum1 += e1;
        }
        const vf sum = sum0 + sum1;
        alpha[r] = std::exp(m[r] - m_new);  // 0 when m[r] = -inf
        l[r] = l[r] * alpha[r] + hsum(sum);
        m[r] = m_new;
      }
      const float* vh = vp.get() + (bh * p.S + k0) * p.D;  // rows past S meet p = 0 ...
      const int64_t valid = std::min(w, p.S - k0);          // ... but are not there: stop at S
      gemm_dim(rows, p.D, valid, s, w, 1, vh, p.D, acc, p.D, alpha);
    });
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = t0 + r / p.G, g = r % p.G;
      float* dst = const_cast<float*>(p.row(o, b, t, h * p.G + g, p.N, p.T));
      const float inv = l[r] > 0 ? 1.0f / l[r] : 0.0f;
      for (int64_t d = 0; d < p.D; ++d) dst[d] = acc[r * p.D + d] * inv;
      lse[((b * p.K + h) * p.T + t) * p.G + g] =
          l[r] > 0 ? m[r] + std::log(l[r]) : std::numeric_limits<float>::infinity();
    }
  });
}

// ------------------------------------------------------------------------- bfloat16 inputs
// q, k, v in bfloat16 (o bfloat16, lse float32). With Intel AMX: both products on the tile unit,
// as FlashAttention does on a GPU: q k^T from the bf16 inputs with float32 accumulation (exact
// products), the softmax in float32, its probabilities rounded to bf16 for p v (float32
// accumulation), the row sums l from the float32 probabilities. Where the scale is positive and
// there is no bias, it is folded into the exponent (max and mask act on the unscaled logits).
// Without AMX the inputs are widened and the float32 kernel runs.

inline uint16_t to_bf16(float x) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

inline float from_bf16(uint16_t x) {
  const uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#if ZOO_AMX
inline void store_bf16(uint16_t* dst, vf lo, vf hi) {  // 32 floats, rounded to nearest even
  const __m512bh r = _mm512_cvtne2ps_pbh(reinterpret_cast<__m512>(hi), reinterpret_cast<__m512>(lo));
  _mm512_storeu_si512(dst, reinterpret_cast<__m512i>(r));
}

inline void store_bf16(uint16_t* dst, vf x) {  // 16 floats
  const __m256bh r = _mm512_cvtneps_pbh(reinterpret_cast<__m512>(x));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), reinterpret_cast<__m256i>(r));
}

// k^T of kv head (b, h) of k [B, S, K, D] as AMX B tiles: [Sp / 16 key blocks][Dp / 32 dim
// blocks][16 rows: dim pairs][16 keys][2], zeros past S and D (Dp: D rounded up to 32). A key's
// row of dim pairs becomes a column of the tile: a transpose of 32-bit pairs.
void pack_k_amx(const Problem& p, const uint16_t* k, int64_t b, int64_t h, uint16_t* out) {
  const int64_t nd = p.Dp / 32;
  // zeros where the loop below does not write: every block when D < Dp, else the blocks past S
  std::fill(out + (p.Dp > p.D ? 0 : p.S / 16 * 16 * p.Dp), out + p.Sp * p.Dp, uint16_t(0));
  uint32_t* o32 = reinterpret_cast<uint32_t*>(out);
  for (int64_t j = 0; j < p.S; ++j) {
    const uint16_t* src = p.row(k, b, j, h, p.K, p.S);
    uint32_t* blk = o32 + (j / 16) * nd * 256 + j % 16;
    for (int64_t i = 0; i < p.D / 2; ++i) {
      uint32_t pair;
      std::memcpy(&pair, src + 2 * i, 4);
      blk[(i / 16) * 256 + (i % 16) * 16] = pair;
    }
  }
}

// The 16-bit lanes [0 16 1 17 ... 15 31]: two rows of 16 bf16 (a in the low half, b in the high)
// as pairs [a0 b0 a1 b1 ... a15 b15], the VNNI layout's 64-byte tile row.
inline __m512i pair_order() {
  alignas(64) static const uint16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_load_si512(order);
}

inline __m512i interleave_bf16(__m256i a, __m256i b) {
  return _mm512_permutexvar_epi16(pair_order(), _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
}

// v of kv head (b, h) of v [B, S, K, D] as AMX B tiles: [D / 16 column blocks][Sp / 32 key
// blocks][16 rows: key pairs][16 columns][2], zeros past S. Every element is written.
void pack_v_amx(const Problem& p, const uint16_t* v, int64_t b, int64_t h, uint16_t* out) {
  const int64_t nk = p.Sp / 32;
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t j = 0; j < p.Sp; j += 2) {
    const uint16_t* a = j < p.S ? p.row(v, b, j, h, p.K, p.S) : nullptr;
    const uint16_t* c = j + 1 < p.S ? p.row(v, b, j + 1, h, p.K, p.S) : nullptr;
    uint16_t* dst = out + (j / 32) * 512 + (j % 32 / 2) * 32;
    for (int64_t d = 0; d < p.D; d += 16) {
      const __m256i x = a ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + d)) : zero;
      const __m256i y = c ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + d)) : zero;
      _mm512_storeu_si512(dst + (d / 16) * nk * 512, interleave_bf16(x, y));
    }
  }
}

// s[i : i + 32, j : j + 32] (float32, row stride lds) = qb[i : i + 32] (bf16 [* x Dp]) @ the k^T
// tiles of keys [k0 + j, k0 + j + 32); i, j, k0 multiples of 32. Four accumulator tiles.
inline void amx_qk_block(const Problem& p, const uint16_t* qb, int64_t i, const uint16_t* kp, int64_t k0,
                         int64_t j, float* s, int64_t lds) {
  const int64_t nd = p.Dp / 32;
  const uint16_t* b0 = kp + (k0 + j) / 16 * nd * 512;
  const uint16_t* b1 = b0 + nd * 512;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t d = 0; d < nd; ++d) {
    _tile_loadd(4, qb + i * p.Dp + d * 32, p.Dp * 2);
    _tile_loadd(5, qb + (i + 16) * p.Dp + d * 32, p.Dp * 2);
    _tile_loadd(6, b0 + d * 512, 64);
    _tile_loadd(7, b1 + d * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  float* c = s + i * lds + j;
  _tile_stored(0, c, lds * 4);
  _tile_stored(1, c + 16, lds * 4);
  _tile_stored(2, c + 16 * lds, lds * 4);
  _tile_stored(3, c + 16 * lds + 16, lds * 4);
}

// t[rp x D] (float32) = pb[rp x w] (bf16, row stride ldp) @ the v tiles of keys [k0, k0 + w).
void amx_pv(const Problem& p, const uint16_t* pb, int64_t rp, int64_t w, int64_t ldp, const uint16_t* vp,
            int64_t k0, float* t, bool accumulate = false) {  // accumulate: t += the product
  const int64_t nk = p.Sp / 32;
  for (int64_t c = 0; c < p.D; c += 32) {
    const bool two = c + 16 < p.D;  // D is a multiple of 16: a last block of 16 columns alone
    const uint16_t* b0 = vp + (c / 16 * nk + k0 / 32) * 512;
    const uint16_t* b1 = b0 + nk * 512;
    for (int64_t i = 0; i < rp; i += 32) {
      float* ci = t + i * p.D + c;
      if (accumulate) {
        _tile_loadd(0, ci, p.D * 4);
        _tile_loadd(2, ci + 16 * p.D, p.D * 4);
        if (two) {
          _tile_loadd(1, ci + 16, p.D * 4);
          _tile_loadd(3, ci + 16 * p.D + 16, p.D * 4);
        }
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int64_t kk = 0; kk < w / 32; ++kk) {
        _tile_loadd(4, pb + i * ldp + kk * 32, ldp * 2);
        _tile_loadd(5, pb + (i + 16) * ldp + kk * 32, ldp * 2);
        _tile_loadd(6, b0 + kk * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        if (two) {
          _tile_loadd(7, b1 + kk * 512, 64);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, ci, p.D * 4);
      _tile_stored(2, ci + 16 * p.D, p.D * 4);
      if (two) {
        _tile_stored(1, ci + 16, p.D * 4);
        _tile_stored(3, ci + 16 * p.D + 16, p.D * 4);
      }
    }
  }
}

void forward_amx(const Problem& p, const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* o,
                 float* lse) {
  const int64_t ksz = p.Sp * p.Dp, vsz = p.Sp * p.D;
  // not zeroed here: the packs write every element (a vector's zeroing cost 3% at S1024)
  std::unique_ptr<uint16_t[]> kp(new uint16_t[p.B * p.K * ksz]), vp(new uint16_t[p.B * p.K * vsz]);
  parallel_for(p.B * p.K, [&](int64_t bh, int) {
    pack_k_amx(p, k, bh / p.K, bh % p.K, kp.get() + bh * ksz);
    pack_v_amx(p, v, bh / p.K, bh % p.K, vp.get() + bh * vsz);
  });
  const int64_t tq = std::max<int64_t>(1, p.rows / p.G);
  const int64_t nq = (p.T + tq - 1) / tq;
  const int64_t R = tq * p.G, Rp = (R + 31) / 32 * 32;
  const bool prescale = p.bias || !(p.scale > 0);  // else the scale goes into the exponent
  const float sc = prescale ? 1.0f : p.scale;
  const int nt = num_threads();
  std::vector<std::vector<float>> scratch(nt);
  std::vector<std::vector<uint16_t>> scratch16(nt);
  parallel_for(p.B * p.K * nq, [&](int64_t task, int worker) {
    const int64_t bh = task % (p.B * p.K), b = bh / p.K, h = bh % p.K;
    const int64_t t0 = (nq - 1 - task / (p.B * p.K)) * tq, t1 = std::min(p.T, t0 + tq);
    const int64_t rows = (t1 - t0) * p.G, rp = (rows + 31) / 32 * 32;
    std::vector<float>& buf = scratch[worker];
    std::vector<uint16_t>& buf16 = scratch16[worker];
    // row strides of the logits and probabilities: an odd number of 64-byte lines (as p.ldt)
    const int64_t lds = p.kv_block + 16, ldp = p.kv_block + 32;
    buf.resize(R * p.D + Rp * p.D + Rp * lds + R * 3);
    buf16.resize(Rp * p.Dp + Rp * ldp);
    float *acc = buf.data(), *t = acc + R * p.D, *s = t + Rp * p.D, *m = s + Rp * lds, *l = m + R,
          *alpha = l + R;
    uint16_t *qb = buf16.data(), *pb = qb + Rp * p.Dp;
    // padding: rows [rows, rp) of q and p, q's columns [D, Dp) (the scratch holds an earlier task's)
    if (p.Dp > p.D) std::fill(qb, qb + rp * p.Dp, uint16_t(0));
    std::fill(qb + rows * p.Dp, qb + rp * p.Dp, uint16_t(0));
    std::fill(pb + rows * ldp, pb + rp * ldp, uint16_t(0));
    for (int64_t tt = t0; tt < t1; ++tt)
      for (int64_t g = 0; g < p.G; ++g)
        std::memcpy(qb + ((tt - t0) * p.G + g) * p.Dp, p.row(q, b, tt, h * p.G + g, p.N, p.T), p.D * 2);
    std::fill(acc, acc + rows * p.D, 0.0f);
    std::fill(m, m + rows, NEG_INF);
    std::fill(l, l + rows, 0.0f);
    configure_tiles();
    const uint16_t* kh = kp.get() + bh * ksz;
    const uint16_t* vh = vp.get() + bh * vsz;
    // Each key tile in strips of 32 rows, each through q k^T, softmax and p v while its logits
    // are in L1 / L2 (the whole tile's q k^T first, then its softmax, then p v: 10-20% slower; q k^T
    // of the next strip issued between this strip's rows, for the tile unit to work beside the
    // vector units: 10% slower still).
    for_key_tiles(p, t0, t1, [&](int64_t k0, int64_t w, bool masked) {
      const vf scv = splat(sc), pscv = splat(p.scale);
      for (int64_t r0 = 0; r0 < rp; r0 += 32) {
        const int64_t r1 = std::min(rows, r0 + 32);
        for (int64_t j = 0; j < w; j += 32) amx_qk_block(p, qb, r0, kh, k0, j, s, lds);
        if (prescale) {
          for (int64_t r = r0; r < r1; ++r)
            for (int64_t j = 0; j < w; j += VW) store(s + r * lds + j, load(s + r * lds + j) * pscv);
          if (p.bias) add_bias(p, s, r1, b, h, t0, k0, w, lds, r0);
        }
        if (masked) mask_tile(p, s, r1, b, h, t0, k0, w, lds, r0);
        for (int64_t r = r0; r < r1; ++r) {
          const float* sr = s + r * lds;
          uint16_t* pr = pb + r * ldp;
          vf mx = splat(NEG_INF);
          for (int64_t j = 0; j < w; j += VW) mx = vmax(mx, load(sr + j));  // a NaN logit: m = NaN
          const float m_new = std::max(m[r], hmax(mx));
          if (m_new == NEG_INF) {  // nothing visible yet: p = 0
            std::fill(pr, pr + w, uint16_t(0));
            alpha[r] = 1.0f;
            continue;
          }
          vf sum0{}, sum1{};
          const vf mv = splat(m_new);
          for (int64_t j = 0; j < w; j += 2 * VW) {
            const vf e0 = vexp((load(sr + j) - mv) * scv), e1 = vexp((load(sr + j + VW) - mv) * scv);
            store_bf16(pr + j, e0, e1);
            sum0 += e0;
            sum1 += e1;
          }
          alpha[r] = std::exp((m[r] - m_new) * sc);  // 0 when m[r] = -inf
          l[r] = l[r] * alpha[r] + hsum(sum0 + sum1);
          m[r] = m_new;
        }
        amx_pv(p, pb + r0 * ldp, 32, w, ldp, vh, k0, t + r0 * p.D);
        for (int64_t r = r0; r < r1; ++r) {
          const vf a = splat(alpha[r]);
          for (int64_t d = 0; d < p.D; d += VW)
            store(acc + r * p.D + d, load(acc + r * p.D + d) * a + load(t + r * p.D + d));
        }
      }
    });
    _tile_release();
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t tt = t0 + r / p.G, g = r % p.G;
      uint16_t* dst = const_cast<uint16_t*>(p.row(o, b, tt, h * p.G + g, p.N, p.T));
      const vf inv = splat(l[r] > 0 ? 1.0f / l[r] : 0.0f);
      for (int64_t d = 0; d < p.D; d += VW) store_bf16(dst + d, load(acc + r * p.D + d) * inv);
      lse[((b * p.K + h) * p.T + tt) * p.G + g] =
          l[r] > 0 ? m[r] * sc + std::log(l[r]) : std::numeric_limits<float>::infinity();
    }
  });
}

// Two rows of 16 floats as bf16 pairs [a0 b0 a1 b1 ... a15 b15]: one 64-byte row of a B tile
// whose k runs over the rows (the VNNI layout).
inline void store_bf16_pairs(uint16_t* dst, vf a, vf b) {
  const __m512bh ab = _mm512_cvtne2ps_pbh(reinterpret_cast<__m512>(b), reinterpret_cast<__m512>(a));
  _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(pair_order(), reinterpret_cast<__m512i>(ab)));
}

// c[D x w] (float32, row stride ldc) += aT[D x rp] (bf16, row stride rp: a matrix's transpose)
// @ b, b's rows the rp query rows as VNNI tiles [w / 16 key blocks][rp / 2 row pairs][32]: dv^T
// += do^T p and dk^T += q^T ds, with the keys along c's rows.
void amx_tn(const Problem& p, const uint16_t* aT, int64_t rp, const uint16_t* b, int64_t w, float* c,
            int64_t ldc) {
  for (int64_t j = 0; j < w; j += 32) {
    const uint16_t* b0 = b + j / 16 * (rp / 2) * 32;
    const uint16_t* b1 = b0 + (rp / 2) * 32;
    for (int64_t d = 0; d < p.D; d += 32) {
      const bool two = d + 16 < p.D;
      float* cd = c + d * ldc + j;
      _tile_loadd(0, cd, ldc * 4);
      _tile_loadd(1, cd + 16, ldc * 4);
      if (two) {
        _tile_loadd(2, cd + 16 * ldc, ldc * 4);
        _tile_loadd(3, cd + 16 * ldc + 16, ldc * 4);
      }
      for (int64_t kk = 0; kk < rp / 32; ++kk) {
        _tile_loadd(4, aT + d * rp + kk * 32, rp * 2);
        _tile_loadd(6, b0 + kk * 16 * 32, 64);
        _tile_loadd(7, b1 + kk * 16 * 32, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (two) {
          _tile_loadd(5, aT + (d + 16) * rp + kk * 32, rp * 2);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, cd, ldc * 4);
      _tile_stored(1, cd + 16, ldc * 4);
      if (two) {
        _tile_stored(2, cd + 16 * ldc, ldc * 4);
        _tile_stored(3, cd + 16 * ldc + 16, ldc * 4);
      }
    }
  }
}

// The backward on bfloat16 inputs with AMX, FlashAttention-2's order per (batch, kv head) task:
// for each block of query rows and each key tile, s = q k^T and dp = do v^T on the tile unit
// (float32 accumulation), p = exp(s - lse) and ds = p (dp - delta) in float32, then p and ds
// rounded to bf16 for dv^T += do^T p, dk^T += q^T ds and dq += ds k (float32 accumulators in
// memory). Gradients are returned in bf16.
void backward_amx(const Problem& p, const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint16_t* o,
                  const float* lse, const uint16_t* dout, uint16_t* dq, uint16_t* dk, uint16_t* dv, float* dbias) {
  const int64_t tq = std::max<int64_t>(1, p.rows / p.G);
  const int64_t R = tq * p.G, Rp = (R + 31) / 32 * 32;
  const int64_t lds = p.kv_block + 16, ldp = p.kv_block + 32, ldk = p.Sp + 16;
  const bool prescale = p.bias || !(p.scale > 0);
  const float sc = prescale ? 1.0f : p.scale;
  const int nt = num_threads();
  std::vector<std::vector<float>> scratch(nt);
  std::vector<std::vector<uint16_t>> scratch16(nt);
  parallel_for(p.B * p.K, [&](int64_t bh, int worker) {
    const int64_t b = bh / p.K, h = bh % p.K;
    std::vector<float>& buf = scratch[worker];
    std::vector<uint16_t>& buf16 = scratch16[worker];
    buf.resize(2 * p.D * ldk + 2 * Rp * lds + Rp * p.D + 2 * Rp);
    buf16.resize(3 * p.Sp * p.Dp + 2 * Rp * p.Dp + 2 * p.D * Rp + 2 * p.kv_block * Rp + Rp * ldp);
    float *dkT = buf.data(), *dvT = dkT + p.D * ldk, *s = dvT + p.D * ldk, *dp = s + Rp * lds, *dqb = dp + Rp * lds,
          *lb = dqb + Rp * p.D, *delta = lb + Rp;
    uint16_t *kT = buf16.data(), *vT = kT + p.Sp * p.Dp, *kV = vT + p.Sp * p.Dp, *qb = kV + p.Sp * p.Dp,
             *dob = qb + Rp * p.Dp, *qT = dob + Rp * p.Dp, *doT = qT + p.D * Rp, *pV = doT + p.D * Rp,
             *dsV = pV + p.kv_block * Rp, *dsr = dsV + p.kv_block * Rp;
    pack_k_amx(p, k, b, h, kT);
    pack_k_amx(p, v, b, h, vT);
    pack_v_amx(p, k, b, h, kV);
    std::fill(dkT, dkT + 2 * p.D * ldk, 0.0f);
    float* db = dbias ? dbias + bh * p.dbg * p.dbt * p.dbs : nullptr;  // this task's own slice
    if (db) std::fill(db, db + p.dbg * p.dbt * p.dbs, 0.0f);
    configure_tiles();
    for (int64_t t0 = 0; t0 < p.T; t0 += tq) {
      const int64_t t1 = std::min(p.T, t0 + tq), rows = (t1 - t0) * p.G, rp = (rows + 31) / 32 * 32;
      std::fill(qb, qb + 2 * Rp * p.Dp + 2 * p.D * Rp, uint16_t(0));  // qb, dob, qT, doT: zero padding
      for (int64_t r = 0; r < rp; ++r) {
        if (r >= rows) {  // padding rows: no visible key (p = 0), ds = 0
          lb[r] = std::numeric_limits<float>::infinity();
          delta[r] = 0;
          continue;
        }
        const int64_t t = t0 + r / p.G, g = r % p.G;
        const uint16_t* qr = p.row(q, b, t, h * p.G + g, p.N, p.T);
        const uint16_t* dr = p.row(dout, b, t, h * p.G + g, p.N, p.T);
        const uint16_t* orow = p.row(o, b, t, h * p.G + g, p.N, p.T);
        std::memcpy(qb + r * p.Dp, qr, p.D * 2);
        std::memcpy(dob + r * p.Dp, dr, p.D * 2);
        float acc = 0;
        for (int64_t d = 0; d < p.D; ++d) {
          qT[d * rp + r] = qr[d];
          doT[d * rp + r] = dr[d];
          acc += from_bf16(orow[d]) * from_bf16(dr[d]);
        }
        delta[r] = acc;
        lb[r] = lse[((b * p.K + h) * p.T + t) * p.G + g];
      }
      std::fill(dqb, dqb + rp * p.D, 0.0f);
      for_key_tiles(p, t0, t1, [&](int64_t k0, int64_t w, bool masked) {
        for (int64_t j = 0; j < w; j += 32)
          for (int64_t i = 0; i < rp; i += 32) {
            amx_qk_block(p, qb, i, kT, k0, j, s, lds);
            amx_qk_block(p, dob, i, vT, k0, j, dp, lds);
          }
        if (prescale) {
          const vf scv = splat(p.scale);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t j = 0; j < w; j += VW) store(s + r * lds + j, load(s + r * lds + j) * scv);
          if (p.bias) add_bias(p, s, rows, b, h, t0, k0, w, lds);
        }
        if (masked) mask_tile(p, s, rows, b, h, t0, k0, w, lds);
        const vf scv = splat(sc);
        for (int64_t r = 0; r < rp; r += 2) {  // row pairs: the VNNI tiles interleave them
          const vf l0 = splat(lb[r]), l1 = splat(lb[r + 1]), d0 = splat(delta[r]), d1 = splat(delta[r + 1]);
          float *s0 = s + r * lds, *s1 = s0 + lds, *dp0 = dp + r * lds, *dp1 = dp0 + lds;
          for (int64_t j = 0; j < w; j += VW) {
            const vf p0 = vexp(load(s0 + j) * scv - l0), p1 = vexp(load(s1 + j) * scv - l1);
            const vf ds0 = p0 * (load(dp0 + j) - d0), ds1 = p1 * (load(dp1 + j) - d1);
            store(dp0 + j, ds0);
            store(dp1 + j, ds1);
            const int64_t tile_row = (j / 16 * (rp / 2) + r / 2) * 32;
            store_bf16_pairs(pV + tile_row, p0, p1);
            store_bf16_pairs(dsV + tile_row, ds0, ds1);
            store_bf16(dsr + r * ldp + j, ds0);
            store_bf16(dsr + (r + 1) * ldp + j, ds1);
          }
        }
        if (db) add_dbias(p, dp, rows, t0, k0, w, db, lds);
        amx_tn(p, doT, rp, pV, w, dvT + k0, ldk);   // dv^T += do^T p
        amx_tn(p, qT, rp, dsV, w, dkT + k0, ldk);   // dk^T += q^T ds
        amx_pv(p, dsr, rp, w, ldp, kV, k0, dqb, true);  // dq += ds k
      });
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t t = t0 + r / p.G, g = r % p.G;
        uint16_t* dst = const_cast<uint16_t*>(p.row(dq, b, t, h * p.G + g, p.N, p.T));
        for (int64_t d = 0; d < p.D; d += VW) store_bf16(dst + d, load(dqb + r * p.D + d) * p.scale);
      }
    }
    _tile_release();
    for (int64_t j = 0; j < p.S; ++j) {
      uint16_t* dkj = const_cast<uint16_t*>(p.row(dk, b, j, h, p.K, p.S));
      uint16_t* dvj = const_cast<uint16_t*>(p.row(dv, b, j, h, p.K, p.S));
      for (int64_t d = 0; d < p.D; ++d) {
        dkj[d] = to_bf16(dkT[d * ldk + j] * p.scale);
        dvj[d] = to_bf16(dvT[d * ldk + j]);
      }
    }
  });
}
#endif  // ZOO_AMX

void backward(const Problem& p, const float* q, const float* k, const float* v, const float* o,
              const float* lse, const float* dout, float* dq, float* dk, float* dv, float* dbias) {
  const int64_t tq = std::max<int64_t>(1, p.rows / p.G);
  const int64_t R = tq * p.G;
  const int nt = num_threads();
  std::vector<std::vector<float>> scratch(nt);
  parallel_for(p.B * p.K, [&](int64_t bh, int worker) {
    const int64_t b = bh / p.K, h = bh % p.K;
    std::vector<float>& buf = scratch[worker];
    buf.resize(2 * p.D * p.ldt + 3 * p.Sp * p.D + 3 * R * p.D + 2 * R * p.kv_block + 2 * R);
    float *kT = buf.data(), *vT = kT + p.D * p.ldt, *kh = vT + p.D * p.ldt, *dkh = kh + p.Sp * p.D,
          *dvh = dkh + p.Sp * p.D, *qb = dvh + p.Sp * p.D, *dob = qb + R * p.D, *dqb = dob + R * p.D, *s = dqb + R * p.D,
          *dp = s + R * p.kv_block, *lb = dp + R * p.kv_block, *delta = lb + R;
    pack_transposed(p, k, b, h, kT);
    pack_transposed(p, v, b, h, vT);
    pack_rows(p, k, b, h, kh);
    float* db = dbias ? dbias + bh * p.dbg * p.dbt * p.dbs : nullptr;  // this task's own slice
    if (db) std::fill(db, db + p.dbg * p.dbt * p.dbs, 0.0f);
    std::fill(dkh, dkh + 2 * p.Sp * p.D, 0.0f);
    for (int64_t t0 = 0; t0 < p.T; t0 += tq) {
      const int64_t t1 = std::min(p.T, t0 + tq), rows = (t1 - t0) * p.G;
      gather_rows(p, q, b, h, t0, t1, p.scale, qb);
      gather_rows(p, dout, b, h, t0, t1, 1.0f, dob);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t t = t0 + r / p.G, g = r % p.G;
        lb[r] = lse[((b * p.K + h) * p.T + t) * p.G + g];
        const float* orow = p.row(o, b, t, h * p.G + g, p.N, p.T);
        float acc = 0;
        for (int64_t d = 0; d < p.D; ++d) acc += orow[d] * dob[r * p.D + d];
        delta[r] = acc;
      }
      std::fill(dqb, dqb + rows * p.D, 0.0f);
      for_key_tiles(p, t0, t1, [&](int64_t k0, int64_t w, bool masked) {
        gemm_keys(rows, w, p.D, qb, p.D, 1, kT + k0, p.ldt, s, w);  // s = q k^T
        if (p.bias) add_bias(p, s, rows, b, h, t0, k0, w);
        if (masked) mask_tile(p, s, rows, b, h, t0, k0, w);
        for (int64_t r = 0; r < rows; ++r) {  // p = exp(s - lse)
          const vf lv = splat(lb[r]);
          for (int64_t j = 0; j < w; j += VW) store(s + r * w + j, vexp(load(s + r * w + j) - lv));
        }
        gemm_keys(rows, w, p.D, dob, p.D, 1, vT + k0, p.ldt, dp, w);  // dp = do v^T
        for (int64_t r = 0; r < rows; ++r) {  // ds = p * (dp - delta)
          const vf dv_ = splat(delta[r]);
          for (int64_t j = 0; j < w; j += VW) {
            float* x = dp + r * w + j;
            store(x, load(s + r * w + j) * (load(x) - dv_));
          }
        }
        if (db) add_dbias(p, dp, rows, t0, k0, w, db);
        gemm_dim(w, p.D, rows, s, 1, w, dob, p.D, dvh + k0 * p.D, p.D);  // dv += p^T do
        gemm_dim(w, p.D, rows, dp, 1, w, qb, p.D, dkh + k0 * p.D, p.D);  // dk += ds^T q
        const int64_t valid = std::min(w, p.S - k0);
        gemm_dim(rows, p.D, valid, dp, w, 1, kh + k0 * p.D, p.D, dqb, p.D);  // dq += ds k
      });
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t t = t0 + r / p.G, g = r % p.G;
        float* dst = const_cast<float*>(p.row(dq, b, t, h * p.G + g, p.N, p.T));
        for (int64_t d = 0; d < p.D; ++d) dst[d] = dqb[r * p.D + d] * p.scale;
      }
    }
    for (int64_t j = 0; j < p.S; ++j) {
      float* dkj = const_cast<float*>(p.row(dk, b, j, h, p.K, p.S));
      float* dvj = const_cast<float*>(p.row(dv, b, j, h, p.K, p.S));
      std::memcpy(dkj, dkh + j * p.D, p.D * sizeof(float));
      std::memcpy(dvj, dvh + j * p.D, p.D * sizeof(float));
    }
  });
}

// Strides of a [B|1, N|1, T|1, S|1] array x (0 along its broadcast axes) into s; false if x has
// another shape.
template <class Buffer>
bool broadcast_strides(const Buffer& x, const Problem& p, int64_t s[4]) {
  auto d = x.dimensions();
  const int64_t full[4] = {p.B, p.N, p.T, p.S};
  if (d.size() != 4) return false;
  for (int i = 0; i < 4; ++i)
    if (d[i] != full[i] && d[i] != 1) return false;
  s[3] = d[3] == 1 ? 0 : 1;
  s[2] = d[2] == 1 ? 0 : d[3];
  s[1] = d[1] == 1 ? 0 : d[2] * d[3];
  s[0] = d[0] == 1 ? 0 : d[1] * d[2] * d[3];
  return true;
}

template <class QKV>
ffi::Error problem(QKV& q, QKV& k, QKV& v, ffi::Buffer<ffi::PRED>& mask, ffi::Buffer<ffi::F32>& bias, bool has_mask, bool has_bias,
                   bool causal, int64_t wl, int64_t wr, float scale, int64_t rows, int64_t kv_block, Problem& p) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("zoo attention: q, k, v must have rank 4");
  p = Problem{qd[0], qd[1], qd[2], kd[1], kd[2], qd[3], 0, causal, wl, wr, scale, rows, kv_block, 0, 0};
  for (int i = 0; i < 4; ++i)
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("zoo attention: k and v differ in shape");
  if (kd[0] != p.B || kd[3] != p.D || p.K == 0 || p.N % p.K)
    return ffi::Error::InvalidArgument("zoo attention: q [B,T,N,D] and k [B,S,K,D] disagree");
  if (p.D % VW)
    return ffi::Error::InvalidArgument("zoo attention: the head dim must be a multiple of " +
                                       std::to_string(VW));
  if (rows < 1 || kv_block < COL_ALIGN || kv_block % COL_ALIGN)
    return ffi::Error::InvalidArgument("zoo attention: block_q must be >= 1 and block_k a positive "
                                       "multiple of " + std::to_string(COL_ALIGN));
  p.G = p.N / p.K;
  int64_t st[4];
  if (has_mask) {
    if (!broadcast_strides(mask, p, st) || (mask.dimensions()[0] != p.B))
      return ffi::Error::InvalidArgument("zoo attention: the mask must be [B, N|1, T|1, S|1]");
    p.mask = mask.typed_data();
    p.msb = st[0], p.msn = st[1], p.mst = st[2], p.mss = st[3];
  }
  if (has_bias) {
    if (!broadcast_strides(bias, p, st))
      return ffi::Error::InvalidArgument("zoo attention: the bias must be [B|1, N|1, T|1, S|1]");
    p.bias = bias.typed_data();
    p.bsb = st[0], p.bsn = st[1], p.bst = st[2], p.bss = st[3];
    auto bd = bias.dimensions();
    p.dbg = bd[1] == 1 ? 1 : p.G, p.dbt = bd[2], p.dbs = bd[3];
  }
  p.Sp = (p.S + COL_ALIGN - 1) / COL_ALIGN * COL_ALIGN;
  // blocks past the problem's size (block_q=10**9: one block) hold what one block would
  p.rows = std::min(p.rows, std::max<int64_t>(1, p.T) * p.G);
  p.kv_block = std::min(p.kv_block, std::max(COL_ALIGN, p.Sp));
  p.ldt = p.Sp + 16;
  p.Dp = (p.D + 31) / 32 * 32;
  return ffi::Error::Success();
}

// The kernels for each input dtype. float32: the FMA kernels. bfloat16: the AMX kernels where
// they run (amx_enabled()), else the float32 kernels on widened copies (outputs rounded back).
void run_forward(const Problem& p, const float* q, const float* k, const float* v, float* o, float* lse) {
  forward(p, q, k, v, o, lse);
}

void run_backward(const Problem& p, const float* q, const float* k, const float* v, const float* o,
                  const float* lse, const float* dout, float* dq, float* dk, float* dv, float* db) {
  backward(p, q, k, v, o, lse, dout, dq, dk, dv, db);
}

// Without AMX, bfloat16 runs the float32 kernels on widened copies, made and rounded back in
// parallel chunks (one serial pass each took ~5 ms of a 13 ms S1024 causal forward). Their
// memory is kept for the calling thread's next call, up to CACHED_BYTES a copy: glibc handed
// these megabytes back to the OS after each call, and faulting them in again (~2,000 page
// faults a call, ~2 us each on the 2-core VMs) cost as much as the conversions. Beyond that
// size the kernels' O(T * S) work dwarfs the faults. Not zeroed: every element is written.
constexpr int64_t CONVERT_CHUNK = 1 << 15;
constexpr int64_t CACHED_BYTES = int64_t(16) << 20;  // so at most 8 x 16 MB kept a thread

struct Floats {  // n floats: the calling thread's cached block `slot`, or a block of its own
  Floats(int slot, int64_t n) {
    thread_local std::vector<float> cache[8];
    if (n * 4 <= CACHED_BYTES) {
      if (static_cast<int64_t>(cache[slot].size()) < n) cache[slot].resize(n);
      data = cache[slot].data();
    } else {
      own.reset(new float[n]);
      data = own.get();
    }
  }
  float* data;
  std::unique_ptr<float[]> own;
};

Floats widen(int slot, const uint16_t* x, int64_t n) {
  Floats out(slot, n);
  float* o = out.data;
  parallel_for((n + CONVERT_CHUNK - 1) / CONVERT_CHUNK, [&](int64_t c, int) {
    for (int64_t i = c * CONVERT_CHUNK, end = std::min(n, i + CONVERT_CHUNK); i < end; ++i) o[i] = from_bf16(x[i]);
  });
  return out;
}

void narrow(const float* x, int64_t n, uint16_t* out) {
  parallel_for((n + CONVERT_CHUNK - 1) / CONVERT_CHUNK, [&](int64_t c, int) {
    for (int64_t i = c * CONVERT_CHUNK, end = std::min(n, i + CONVERT_CHUNK); i < end; ++i) out[i] = to_bf16(x[i]);
  });
}

void run_forward(const Problem& p, const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* o,
                 float* lse) {
#if ZOO_AMX
  if (amx_enabled()) return forward_amx(p, q, k, v, o, lse);
#endif
  const int64_t nq = p.B * p.T * p.N * p.D, nk = p.B * p.S * p.K * p.D;
  const Floats qf = widen(0, q, nq), kf = widen(1, k, nk), vf = widen(2, v, nk), of(3, nq);
  forward(p, qf.data, kf.data, vf.data, of.data, lse);
  narrow(of.data, nq, o);
}

void run_backward(const Problem& p, const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint16_t* o,
                  const float* lse, const uint16_t* dout, uint16_t* dq, uint16_t* dk, uint16_t* dv, float* db) {
#if ZOO_AMX
  if (amx_enabled()) return backward_amx(p, q, k, v, o, lse, dout, dq, dk, dv, db);
#endif
  const int64_t nq = p.B * p.T * p.N * p.D, nk = p.B * p.S * p.K * p.D;
  {  // blocks 0-4: q, k, v, o, do widened; 5-7: dq, dk, dv
    const Floats qf = widen(0, q, nq), kf = widen(1, k, nk), vf = widen(2, v, nk), of = widen(3, o, nq),
                 df = widen(4, dout, nq);
    Floats dqf(5, nq), dkf(6, nk), dvf(7, nk);
    backward(p, qf.data, kf.data, vf.data, of.data, lse, df.data, dqf.data, dkf.data, dvf.data, db);
    narrow(dqf.data, nq, dq);
    narrow(dkf.data, nk, dk);
    narrow(dvf.data, nk, dv);
  }
}

// The handlers, for T = F32 or BF16 (q, k, v, o, do and the gradients; mask, bias, lse and dbias
// keep their types).
template <ffi::DataType T>
ffi::Error Forward(ffi::Buffer<T> q, ffi::Buffer<T> k, ffi::Buffer<T> v, ffi::Buffer<ffi::PRED> mask,
                   ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<T> o, ffi::ResultBuffer<ffi::F32> lse, bool causal,
                   int64_t wl, int64_t wr, float scale, int64_t block_q, int64_t block_k, bool has_mask,
                   bool has_bias) {
  Problem p;
  if (ffi::Error e = problem(q, k, v, mask, bias, has_mask, has_bias, causal, wl, wr, scale, block_q, block_k, p);
      !e.success())
    return e;
  if (p.B * p.T * p.N == 0) return ffi::Error::Success();
  run_forward(p, q.typed_data(), k.typed_data(), v.typed_data(), o->typed_data(), lse->typed_data());
  return ffi::Error::Success();
}

template <ffi::DataType T>
ffi::Error Backward(ffi::Buffer<T> q, ffi::Buffer<T> k, ffi::Buffer<T> v, ffi::Buffer<ffi::PRED> mask,
                    ffi::Buffer<ffi::F32> bias, ffi::Buffer<T> o, ffi::Buffer<ffi::F32> lse, ffi::Buffer<T> dout,
                    ffi::ResultBuffer<T> dq, ffi::ResultBuffer<T> dk, ffi::ResultBuffer<T> dv,
                    ffi::ResultBuffer<ffi::F32> dbias, bool causal, int64_t wl, int64_t wr, float scale,
                    int64_t block_q, int64_t block_k, bool has_mask, bool has_bias, bool bias_grad) {
  Problem p;
  if (ffi::Error e = problem(q, k, v, mask, bias, has_mask, has_bias, causal, wl, wr, scale, block_q, block_k, p);
      !e.success())
    return e;
  float* db = has_bias && bias_grad ? dbias->typed_data() : nullptr;
  if (db && dbias->element_count() != p.B * p.K * p.dbg * p.dbt * p.dbs)
    return ffi::Error::InvalidArgument("zoo attention: dbias must be [B, K, G|1, T|1, S|1]");
  if (db) std::fill(db, db + dbias->element_count(), 0.0f);
  if (p.S == 0) {  // no keys: every output is zero (dk, dv are empty)
    std::fill(dq->typed_data(), dq->typed_data() + p.B * p.T * p.N * p.D, 0);
    return ffi::Error::Success();
  }
  if (p.B * p.K * p.D == 0) return ffi::Error::Success();
  run_backward(p, q.typed_data(), k.typed_data(), v.typed_data(), o.typed_data(), lse.typed_data(),
               dout.typed_data(), dq->typed_data(), dk->typed_data(), dv->typed_data(), db);
  return ffi::Error::Success();
}

// Both handlers' inputs start with q, k, v (of type T), the mask and the bias, and they share
// their attributes (the backward adds bias_grad: whether to compute dbias). The binding's methods
// take it as an rvalue.
using F32 = ffi::Buffer<ffi::F32>;

template <ffi::DataType T, class Binding>
auto with_inputs(Binding binding) {
  return std::move(binding).template Arg<ffi::Buffer<T>>().template Arg<ffi::Buffer<T>>()
      .template Arg<ffi::Buffer<T>>().template Arg<ffi::Buffer<ffi::PRED>>().template Arg<F32>();
}

template <class Binding>
auto with_attrs(Binding binding) {
  return std::move(binding).template Attr<bool>("is_causal")
      .template Attr<int64_t>("window_left")
      .template Attr<int64_t>("window_right")
      .template Attr<float>("scale")
      .template Attr<int64_t>("block_q")
      .template Attr<int64_t>("block_k")
      .template Attr<bool>("has_mask")
      .template Attr<bool>("has_bias");
}

template <ffi::DataType T>
auto forward_binding() {
  return with_attrs(with_inputs<T>(ffi::Ffi::Bind()).template Ret<ffi::Buffer<T>>().template Ret<F32>());
}

template <ffi::DataType T>
auto backward_binding() {
  using X = ffi::Buffer<T>;
  return with_attrs(with_inputs<T>(ffi::Ffi::Bind())
                        .template Arg<X>()    // o
                        .template Arg<F32>()  // lse
                        .template Arg<X>()    // do
                        .template Ret<X>()
                        .template Ret<X>()
                        .template Ret<X>()
                        .template Ret<F32>())  // dbias
      .template Attr<bool>("bias_grad");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooAttentionForward, Forward<ffi::F32>, forward_binding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooAttentionForwardBf16, Forward<ffi::BF16>, forward_binding<ffi::BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooAttentionBackward, Backward<ffi::F32>, backward_binding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooAttentionBackwardBf16, Backward<ffi::BF16>, backward_binding<ffi::BF16>());
