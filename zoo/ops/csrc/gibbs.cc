// Block-Gibbs chains of a Bernoulli RBM for the CPU (float32), as an XLA FFI custom call.
//
// zoo.ops.native compiles this file with attention.cc into one library. Inputs: W [V, H], b [V],
// c [H], v0 [B, V]; seeds [B, K, 2, 2] uint32 (for each chain, sweep and half-sweep (h, then v)
// the two seeds of zoo.ops.gibbs's "hash" uniforms); rows [B] uint32 (each chain's row in the
// array its uniforms are drawn for). Output [B, Ko, V]: every sweep's v (keep_history, Ko = K) or
// the last (Ko = 1). Sweep k of chain r:
//   h = [u < sigmoid(c + v W)],   v = [u < sigmoid(b + h W^T)],
// u of element j of an n-wide draw: x = mix(mix((rows[r] * n + j) ^ s0) + s1), its top 23 bits as
// a float in [0, 1), with mix lowbias32 -- the uniforms zoo.ops.gibbs.uniform draws in XLA, so the
// two give the same chain for a key (up to a comparison that the two programs' roundings of p
// decide differently, a chance of about 1e-7 per unit).
//
// Chains are independent: one task per block of chains runs all K sweeps for them, so tasks
// never wait for each other. Within a task: v W into an [R, H] tile by the shared GEMM, then the
// hidden units sampled in place; h W^T into the [R, V] tile that held v, then v sampled in place.
// W is packed twice per call, as W and as W^T, for the two GEMMs: float32 panels for the FMA
// GEMM, bf16 AMX tiles of its three parts for the AMX one (below).

#include "simd.h"

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef uint32_t vu __attribute__((vector_size(VW * 4), aligned(4)));

#if defined(__AVX512F__)
constexpr int MR = 8, NV = 2;
#else
constexpr int MR = 6, NV = 2;
#endif

// lowbias32 (C. Wellons' hash prospector), as zoo.ops.gibbs._mix32.
inline vu mix(vu x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

constexpr int64_t PW = NV * VW;  // columns per packed panel of W

// A row length padded to whole panels, plus one more vector where that is an even number of
// 64-byte lines: rows read together then do not all fall in the same few L1 sets.
int64_t padded(int64_t n) {
  const int64_t p = (n + PW - 1) / PW * PW;
  return (p * 4 / 64) % 2 ? p : p + 16;
}

// x [m, n] (row-major) transposed, [n, m], in 32 x 32 blocks (both sides stay in cache).
std::vector<float> transpose(const float* x, int64_t m, int64_t n) {
  std::vector<float> out(m * n);
  for (int64_t i0 = 0; i0 < m; i0 += 32)
    for (int64_t j0 = 0; j0 < n; j0 += 32)
      for (int64_t i = i0; i < std::min(m, i0 + 32); ++i)
        for (int64_t j = j0; j < std::min(n, j0 + 32); ++j) out[j * m + i] = x[i * n + j];
  return out;
}

// x [kd, n] (row-major) packed as panels of PW columns, [n / PW][kd][PW] (n rounded up to whole
// panels, zero past it): each panel is read front to back.
std::vector<float> pack_panels(const float* x, int64_t kd, int64_t n) {
  const int64_t panels = (n + PW - 1) / PW;
  std::vector<float> out(panels * kd * PW, 0.0f);
  for (int64_t j = 0; j < panels; ++j) {
    const int64_t w = std::min(PW, n - j * PW);
    for (int64_t k = 0; k < kd; ++k) std::memcpy(&out[(j * kd + k) * PW], x + k * n + j * PW, w * 4);
  }
  return out;
}

// c[m x panels * PW] = a[m x kd] @ b, b packed by pack_panels; a row i at a + i * lda. Panels
// outermost (one panel's chunk of KC rows, 16 KB, stays in L1 for every row block), then chunks
// along kd, then row blocks.
void gemm_panels(int64_t m, int64_t panels, int64_t kd, const float* a, int64_t lda, const float* b,
                 float* c, int64_t ldc) {
  if (kd == 0)  // an empty sum (a layer of no units): zeros
    for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + panels * PW, 0.0f);
  for (int64_t j = 0; j < panels; ++j) {
    const float* bj = b + j * kd * PW;
    for (int64_t k0 = 0; k0 < kd; k0 += KC) {
      const int64_t kc = std::min(KC, kd - k0);
      for (int64_t i = 0; i < m; i += MR) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, m - i));
        float* cij = c + i * ldc + j * PW;
        if (mr == MR) tile<MR, NV>(kc, a + i * lda + k0, lda, 1, bj + k0 * PW, PW, cij, ldc, k0 > 0, nullptr);
        else tile_rows<MR, NV>(mr, kc, a + i * lda + k0, lda, 1, bj + k0 * PW, PW, cij, ldc, k0 > 0, nullptr);
      }
    }
  }
}

// x[j] <- [u_j < sigmoid(x[j] + bias[j])] for j < width (a multiple of VW; bias padded to it),
// u_j the hash uniform of position base + j under seeds (s0, s1); the same 0 / 1 also into
// state[j] as bfloat16 where state is given. u < 1 / (1 + e^-z) is tested as u (1 + e^-z) < 1 (no
// division; e^-z is capped at e^88, where p is below float32's normals). threshold_only: x[j] >= 0
// instead (the GEMMs' ceiling: the chain without its sampling).
void sample(float* x, int64_t width, const float* bias, uint32_t base, uint32_t s0, uint32_t s1,
            uint16_t* state, bool threshold_only) {
  typedef int16_t vh __attribute__((vector_size(VW * 2), aligned(2)));
  vu lane;
  for (int i = 0; i < VW; ++i) lane[i] = static_cast<uint32_t>(i);
  const vf one = splat(1.0f), cap = splat(88.0f);
  const vi one_bits = (vi)one;  // GCC: a cast between vector types of one size keeps the bits
  for (int64_t j = 0; j < width; j += VW) {
    const vu bits = mix(mix((lane + static_cast<uint32_t>(base + j)) ^ s0) + s1);
    const vu mant = (bits >> 9) | 0x3F800000u;
    const vf u = (vf)mant - one;
    const vf z = load(x + j) + load(bias + j);
    const vi on = threshold_only ? load(x + j) >= vf{} : u * (one + vexp(vmin(cap, -z))) < one;
    const vi r = on & one_bits;
    store(x + j, (vf)r);
    if (state) *reinterpret_cast<vh*>(state + j) = __builtin_convertvector(r >> 16, vh);  // 0x3F80: 1.0
  }
}

#if ZOO_AMX
// The chain's states are 0 / 1, exact in bfloat16, and W is split into three bfloat16 parts
// W1 + W2 + W3 (each the rounding of what the previous ones leave): their sum holds W to 2^-24
// relative or better, the products are exact and accumulate in float32, so the result has
// float32's accuracy (the "bf16x3" of XLA's TPU precision), at 3 products per term.
constexpr int64_t AMX_PARTS = 3;

// x [kd, n] (row-major) as AMX B tiles of its three bf16 parts: [n/16][kd/32][part][16 rows: k
// pairs][16 columns][2: k even, odd] (n to 32, kd to 32, zeros). Each part is the rounding of
// what the earlier ones leave (a non-finite x: all in the first part). Vectorised: 16 columns of
// two rows of x at a time become one 64-byte tile row per part.
std::vector<uint16_t> pack_amx(const float* x, int64_t kd, int64_t n) {
  const int64_t nb = (n + 31) / 32 * 2, kb = (kd + 31) / 32;
  std::vector<uint16_t> out(nb * kb * AMX_PARTS * 512, 0);
  __m512i pairs;  // [a0, b0, a1, b1, ...] from a (lanes 0-15) and b (lanes 32-47)
  alignas(64) uint16_t idx[32];
  for (int i = 0; i < 16; ++i) idx[2 * i] = static_cast<uint16_t>(i), idx[2 * i + 1] = static_cast<uint16_t>(32 + i);
  pairs = _mm512_load_si512(idx);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t jb = 0; jb < nb; ++jb) {
    const int64_t j0 = jb * 16;
    if (j0 >= n) break;  // the zero columns past n
    const __mmask16 cols = static_cast<__mmask16>((1u << std::min<int64_t>(16, n - j0)) - 1);
    for (int64_t k = 0; k < kd; k += 2) {
      __m512 r0 = _mm512_maskz_loadu_ps(cols, x + k * n + j0);
      __m512 r1 = k + 1 < kd ? _mm512_maskz_loadu_ps(cols, x + (k + 1) * n + j0) : zero;
      const __mmask16 f0 = _mm512_cmp_ps_mask(_mm512_sub_ps(r0, r0), zero, _CMP_EQ_OQ);  // finite
      const __mmask16 f1 = _mm512_cmp_ps_mask(_mm512_sub_ps(r1, r1), zero, _CMP_EQ_OQ);
      uint16_t* row = out.data() + ((jb * kb + k / 32) * AMX_PARTS * 16 + k % 32 / 2) * 32;
      for (int64_t part = 0; part < AMX_PARTS; ++part) {
        const __m256i h0 = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(r0));
        const __m256i h1 = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(r1));
        _mm512_storeu_si512(row + part * 512, _mm512_permutex2var_epi16(_mm512_castsi256_si512(h0), pairs,
                                                                          _mm512_castsi256_si512(h1)));
        // what is left: exact (h is its rounding); zero where x is not finite
        r0 = _mm512_maskz_sub_ps(f0, r0, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h0), 16)));
        r1 = _mm512_maskz_sub_ps(f1, r1, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h1), 16)));
      }
    }
  }
  return out;
}

// c[rows x nb*16] = a[rows x kb*32] @ b: a bf16 rows lda apart, b packed by pack_amx, rows a
// multiple of 32, nb even. Blocks of 32 x 32 outputs in four accumulator tiles (0-3); per 32 of
// kd two tiles of a (4, 5) meet each part's two tiles of b (6, 7).
void gemm_amx(int64_t rows, int64_t nb, int64_t kb, const uint16_t* a, int64_t lda, const uint16_t* b,
              float* c, int64_t ldc) {
  for (int64_t jb = 0; jb < nb; jb += 2) {
    const uint16_t* b0 = b + jb * kb * AMX_PARTS * 512;
    const uint16_t* b1 = b0 + kb * AMX_PARTS * 512;
    for (int64_t i = 0; i < rows; i += 32) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const uint16_t* ai = a + i * lda;
      for (int64_t k = 0; k < kb; ++k) {
        _tile_loadd(4, ai + k * 32, lda * 2);
        _tile_loadd(5, ai + 16 * lda + k * 32, lda * 2);
        for (int64_t part = 0; part < AMX_PARTS; ++part) {
          _tile_loadd(6, b0 + (k * AMX_PARTS + part) * 512, 64);
          _tile_loadd(7, b1 + (k * AMX_PARTS + part) * 512, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      float* ci = c + i * ldc + jb * 16;
      _tile_stored(0, ci, ldc * 4);
      _tile_stored(1, ci + 16, ldc * 4);
      _tile_stored(2, ci + 16 * ldc, ldc * 4);
      _tile_stored(3, ci + 16 * ldc + 16, ldc * 4);
    }
  }
}
#else
#endif

// bf16 row stride for n columns: n to 32, plus 32 where that is an even number of 64-byte lines.
int64_t padded_bf16(int64_t n) {
  const int64_t p = (n + 31) / 32 * 32;
  return (p * 2 / 64) % 2 ? p : p + 32;
}

struct Chain {
  int64_t B, V, H, K;
  int64_t Vp, Hp;  // float32 row strides: V and H padded (padded())
  bool keep_history;
  int64_t rows;    // chains per task
  bool amx;        // the AMX GEMMs (else the FMA ones)
  bool gemm_only;  // units on where x >= 0: no uniforms, biases or exp (a ceiling for benchmarks)
};

bool binary(const float* x, int64_t n) {  // branch-free within blocks (0 / 1 at random defeats a
  for (int64_t i0 = 0; i0 < n; i0 += 4096) {  // predictor: 7 ns per element with a branch each)
    bool other = false;
    for (int64_t i = i0; i < std::min(n, i0 + 4096); ++i) other |= (x[i] != 0.0f) & (x[i] != 1.0f);
    if (other) return false;
  }
  return true;
}

void run(const Chain& p, const float* W, const float* b, const float* c, const float* v0,
         const uint32_t* seeds, const uint32_t* row_ids, float* out) {
  const int64_t panels_v = (p.V + PW - 1) / PW, panels_h = (p.H + PW - 1) / PW;
  const int64_t width_v = panels_v * PW, width_h = panels_h * PW;
  std::vector<float> bp(p.Vp, 0.0f), cp(p.Hp, 0.0f);
  std::copy(b, b + p.V, bp.begin());
  std::copy(c, c + p.H, cp.begin());
  // W and W^T packed for the GEMMs: float32 panels, or AMX tiles, with float32 panels of W as
  // well where a start state is not 0 / 1 (its first product then takes the FMA path)
  const bool v0_binary = !p.amx || binary(v0, p.B * p.V);
  std::vector<float> Wp, WTp;
  std::vector<uint16_t> Wa, WTa;
  parallel_for(2, [&](int64_t which, int) {  // W on one thread, W^T on another
    std::vector<float> WT = which == 1 ? transpose(W, p.V, p.H) : std::vector<float>();
#if ZOO_AMX
    if (p.amx) {
      if (which == 0) Wa = pack_amx(W, p.V, p.H);
      else WTa = pack_amx(WT.data(), p.H, p.V);
    }
#endif
    if (which == 0 && (!p.amx || !v0_binary)) Wp = pack_panels(W, p.V, p.H);
    if (which == 1 && !p.amx) WTp = pack_panels(WT.data(), p.H, p.V);
  });
  const int64_t lda_v = padded_bf16(p.V), lda_h = padded_bf16(p.H);
  const int nt = num_threads();
  std::vector<std::vector<float>> scratch(nt);
  std::vector<std::vector<uint16_t>> states(nt);
  // chains per task: p.rows, or fewer where that leaves a thread idle (in multiples of the AMX
  // GEMM's 32 rows, else of the FMA tile's rows)
  const int64_t unit = p.amx ? 32 : MR;
  const int64_t rows = std::min(p.rows, std::max(unit, (p.B + nt * unit - 1) / (nt * unit) * unit));
  const int64_t tasks = (p.B + rows - 1) / rows;
  parallel_for(tasks, [&](int64_t task, int worker) {
    const int64_t r0 = task * rows, R = std::min(rows, p.B - r0), Rp = (R + 31) / 32 * 32;
    std::vector<float>& buf = scratch[worker];
    buf.assign(Rp * (p.Vp + p.Hp), 0.0f);
    float *vb = buf.data(), *hb = vb + Rp * p.Vp;
    uint16_t *sv = nullptr, *sh = nullptr;  // the states as bf16, for the AMX GEMMs
    for (int64_t r = 0; r < R; ++r) std::memcpy(vb + r * p.Vp, v0 + (r0 + r) * p.V, p.V * 4);
#if ZOO_AMX
    if (p.amx) {
      states[worker].assign(Rp * (lda_v + lda_h), 0);
      sv = states[worker].data(), sh = sv + Rp * lda_v;
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < p.V; j += 16) {  // 0 / 1 (else the first product is FMA's)
          const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, p.V - j)) - 1);
          const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, vb + r * p.Vp + j)));
          _mm256_mask_storeu_epi16(sv + r * lda_v + j, m, h);
        }
      configure_tiles();
    }
#endif
    for (int64_t k = 0; k < p.K; ++k) {
#if ZOO_AMX
      if (p.amx && (k > 0 || v0_binary))
        gemm_amx(Rp, width_h / 16, (p.V + 31) / 32, sv, lda_v, Wa.data(), hb, p.Hp);
      else
#endif
        gemm_panels(R, panels_h, p.V, vb, p.Vp, Wp.data(), hb, p.Hp);
      for (int64_t r = 0; r < R; ++r) {
        const uint32_t* s = seeds + ((r0 + r) * p.K + k) * 4;
        sample(hb + r * p.Hp, width_h, cp.data(), row_ids[r0 + r] * static_cast<uint32_t>(p.H), s[0], s[1],
               sh ? sh + r * lda_h : nullptr, p.gemm_only);
      }
#if ZOO_AMX
      if (p.amx)
        gemm_amx(Rp, width_v / 16, (p.H + 31) / 32, sh, lda_h, WTa.data(), vb, p.Vp);
      else
#endif
        gemm_panels(R, panels_v, p.H, hb, p.Hp, WTp.data(), vb, p.Vp);
      for (int64_t r = 0; r < R; ++r) {
        const uint32_t* s = seeds + ((r0 + r) * p.K + k) * 4 + 2;
        sample(vb + r * p.Vp, width_v, bp.data(), row_ids[r0 + r] * static_cast<uint32_t>(p.V), s[0], s[1],
               sv ? sv + r * lda_v : nullptr, p.gemm_only);
      }
      if (p.keep_history || k == p.K - 1) {
        const int64_t ko = p.keep_history ? p.K : 1, kk = p.keep_history ? k : 0;
        for (int64_t r = 0; r < R; ++r)
          std::memcpy(out + ((r0 + r) * ko + kk) * p.V, vb + r * p.Vp, p.V * 4);
      }
    }
#if ZOO_AMX
    if (p.amx) _tile_release();
#endif
  });
}

ffi::Error Chain_(ffi::Buffer<ffi::F32> W, ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> c,
                  ffi::Buffer<ffi::F32> v0, ffi::Buffer<ffi::U32> seeds, ffi::Buffer<ffi::U32> rows,
                  ffi::ResultBuffer<ffi::F32> out, bool keep_history, int64_t block_rows, int64_t method,
                  bool gemm_only) {
  auto wd = W.dimensions(), vd = v0.dimensions(), sd = seeds.dimensions();
  if (wd.size() != 2 || vd.size() != 2 || sd.size() != 4)
    return ffi::Error::InvalidArgument("zoo gibbs: W and v0 must have rank 2, seeds rank 4");
  Chain p{vd[0], wd[0], wd[1], sd[1], 0, 0, keep_history, block_rows, false, gemm_only};
  if (vd[1] != p.V || int64_t(b.element_count()) != p.V || int64_t(c.element_count()) != p.H)
    return ffi::Error::InvalidArgument("zoo gibbs: W [V, H], b [V], c [H] and v0 [B, V] disagree");
  if (sd[0] != p.B || sd[2] != 2 || sd[3] != 2 || int64_t(rows.element_count()) != p.B)
    return ffi::Error::InvalidArgument("zoo gibbs: seeds must be [B, K, 2, 2] and rows [B]");
  if (block_rows < 1) return ffi::Error::InvalidArgument("zoo gibbs: block_rows must be >= 1");
  if (method < 0 || method > 2) return ffi::Error::InvalidArgument("zoo gibbs: method must be 0, 1 or 2");
  // method 0: AMX where the CPU and the OS allow it (and ZOO_NATIVE_AMX is not 0), else FMA;
  // 1: FMA; 2: AMX or an error
  p.amx = method == 0 ? amx_enabled() : method == 2 && amx_permitted();
  if (method == 2 && !p.amx) return ffi::Error::InvalidArgument("zoo gibbs: no AMX on this CPU / OS / build");
  if (p.B * p.V * p.K == 0) return ffi::Error::Success();
  p.Vp = padded(p.V);
  p.Hp = padded(p.H);
  run(p, W.typed_data(), b.typed_data(), c.typed_data(), v0.typed_data(), seeds.typed_data(),
      rows.typed_data(), out->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooGibbsChain, Chain_,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v0
                                  .Arg<ffi::Buffer<ffi::U32>>()  // seeds
                                  .Arg<ffi::Buffer<ffi::U32>>()  // rows
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("keep_history")
                                  .Attr<int64_t>("block_rows")
                                  .Attr<int64_t>("method")
                                  .Attr<bool>("gemm_only"));
