// cuBLASLt matmuls with the backward epilogues XLA never emits, as XLA FFI custom calls.
//
// DGELU_BGRAD (ZooCublasLtDgelu): dz = (g @ w^T) * GELU'(z) and dbias = the column sums of dz,
// in one matmul: g [M, K] (the proj output's gradient), w [N, K] (the proj kernel, Flax's
// [in, out] read as [N, K]), z [M, N] (the GELU's input) -> dz [M, N] and dbias [N]. XLA's form
// writes g @ w^T, then a pass reads that and z again (zoo.ops.matmul_gelu). In cuBLASLt's
// column-major terms the row-major arrays are transposed: D = dz^T (N x M, ld N) = op(A) B with
// A = w's memory (K x N, ld K, transposed), B = g's memory (K x M, ld K); the aux input is z's
// memory (N x M, ld N); the bias gradient has D's N rows, summed over its M columns. With the
// attribute w_kn (zoo.ops.cublaslt's default), w comes transposed, [K, N]: A = its memory
// (N x K, ld N), not transposed (TransformerEngine's form, its weights [out, in]).
//
// BGRADB or BGRADA (ZooCublasLtWgrad, its attribute `epilogue`): a dense layer's weight and
// bias gradients in one matmul: x [M, I] (its input), dy [M, F] (its output's gradient) -> the
// weight gradient x^T dy and db [F] = dy's column sums, summed by the epilogue from the
// matmul's own operand as it reads it: XLA's form sums dy in a pass of its own.
// - BGRADB writes it transposed, dwt [F, I]: D = x^T dy (column-major I x F, ld I: its memory is
//   dwt) = A op(B) with A = x's memory (I x M, ld I), B = dy's memory (F x M, ld F, transposed);
//   the bias gradient has D's F columns, summed over the matmul's k = M. TransformerEngine's
//   mapping for its weight gradients ("NT", where D is PyTorch's [out, in] kernel).
// - BGRADA writes dw [I, F] as Flax keeps its kernel: D = dy^T x (column-major F x I, ld F: its
//   memory is dw) = A op(B) with A = dy's memory (F x M, ld F), B = x's memory (I x M, ld I,
//   transposed); the bias gradient has D's F rows, summed over k = M.
//
// All in one dtype (bfloat16 or float16; cuBLASLt writes bias gradients in the output's type,
// summed in float32).
//
// No CUDA header or library is needed to build it: the few cuBLASLt and driver declarations it
// uses are written out in cublaslt_abi.h (their values from cublasLt.h, cublas_api.h and
// library_types.h of CUDA 13; checked against those headers by tests/ops/test_cublaslt.py where
// they are found), and libcublasLt is found at run time: the copy JAX's CUDA plugin loaded (XLA's
// matmuls use it), else the path zoo.ops.cublaslt passes.

#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "cublaslt_abi.h"
#include "ffi_cuda.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace zoo_lt;
using zoo_cuda::StreamContext;

struct Api {
  Status (*create)(Handle *);
  size_t (*version)();
  const char *(*status_string)(Status);
  Status (*desc_create)(Desc *, int, int);
  Status (*desc_set)(Desc, int, const void *, size_t);
  Status (*layout_create)(Layout *, int, uint64_t, uint64_t, int64_t);
  Status (*pref_create)(Pref *);
  Status (*pref_set)(Pref, int, const void *, size_t);
  Status (*pref_destroy)(Pref);
  Status (*heuristic)(Handle, Desc, Layout, Layout, Layout, Layout, Pref, int, HeuristicResult *, int *);
  Status (*matmul)(Handle, Desc, const void *, const void *, Layout, const void *, Layout, const void *,
                   const void *, Layout, void *, Layout, const Algo *, void *, size_t, cudaStream_t);
};

constexpr size_t WORKSPACE = size_t{32} << 20;  // TransformerEngine's and PyTorch's for Hopper

std::mutex mu;  // guards everything below, and each plan's descriptor while a matmul is enqueued
void *library = nullptr;
Api api{};
std::unordered_map<int32_t, Handle> handles;  // one per device

// One matmul: D = op(A) op(B) with an epilogue, every matrix column-major and packed (its
// leading dimension its rows) in one dtype, with the rows and columns of each as stored; the
// bias gradient's pointer, and the aux input's (DGELU's z; nullptr: none).
struct Gemm {
  const char *name;  // for errors: "DGELU_BGRAD", "BGRADB"
  uint32_t epilogue;
  int ta, tb;
  uint64_t a_rows, a_cols, b_rows, b_cols, d_rows, d_cols;
  const void *a, *b;
  void *d, *bias;
  const void *aux = nullptr;
  int64_t aux_ld = 0;
};

struct Plan {
  Desc desc = nullptr;
  Layout a = nullptr, b = nullptr, d = nullptr;
  Algo algo{};
  size_t workspace = 0;
};
std::unordered_map<std::string, Plan> plans;

std::string why(const char *what, Status s) {
  const char *text = api.status_string ? api.status_string(s) : nullptr;
  return std::string("cuBLASLt ") + what + ": " + (text ? text : "status " + std::to_string(s));
}

// The largest power of two up to 256 dividing the address: cuBLASLt picks algorithms by the
// alignment its pointers will have.
int64_t alignment(const void *p) {
  auto a = reinterpret_cast<uintptr_t>(p);
  int64_t k = 256;
  while (k > 1 && a % k) k /= 2;
  return k;
}

ffi::Error Check(Status s, const char *what) {
  return s == 0 ? ffi::Error::Success() : ffi::Error::Internal(why(what, s));
}

// The descriptors for this matmul and its pointers' alignments, and the algorithm cuBLASLt's
// heuristic picks for them (its first).
ffi::ErrorOr<Plan> build(Handle handle, int dtype, const Gemm &m) {
  Plan p;
  Status status = 0;
  const char *step = "";
  auto ok = [&](Status s, const char *what) {  // the first failure kept, with its step
    if (status == 0 && s != 0) status = s, step = what;
    return status == 0;
  };
  bool good = ok(api.desc_create(&p.desc, COMPUTE_32F, CUDA_R_32F), "matmul descriptor");
  std::vector<std::tuple<int, const void *, size_t>> attrs = {{DESC_TRANSA, &m.ta, sizeof(m.ta)},
                                                              {DESC_TRANSB, &m.tb, sizeof(m.tb)},
                                                              {DESC_EPILOGUE, &m.epilogue, sizeof(m.epilogue)},
                                                              {DESC_BIAS_POINTER, &m.bias, sizeof(m.bias)}};
  if (m.aux != nullptr) {
    attrs.insert(attrs.end(), {{DESC_AUX_POINTER, &m.aux, sizeof(m.aux)}, {DESC_AUX_LD, &m.aux_ld, sizeof(m.aux_ld)}});
  }
  for (auto [attr, value, size] : attrs) {
    good = good && ok(api.desc_set(p.desc, attr, value, size), "matmul descriptor attribute");
  }
  good = good && ok(api.layout_create(&p.a, dtype, m.a_rows, m.a_cols, m.a_rows), "layout of A") &&
         ok(api.layout_create(&p.b, dtype, m.b_rows, m.b_cols, m.b_rows), "layout of B") &&
         ok(api.layout_create(&p.d, dtype, m.d_rows, m.d_cols, m.d_rows), "layout of D");
  Pref pref = nullptr;
  good = good && ok(api.pref_create(&pref), "preference") &&
         ok(api.pref_set(pref, PREF_MAX_WORKSPACE_BYTES, &WORKSPACE, sizeof(WORKSPACE)), "preference");
  HeuristicResult result{};
  int found = 0;
  good = good && ok(api.heuristic(handle, p.desc, p.a, p.b, p.d, p.d, pref, 1, &result, &found), "heuristic");
  if (pref != nullptr && api.pref_destroy) api.pref_destroy(pref);
  if (!good) return ffi::Unexpected(ffi::Error::Internal(why(step, status)));
  if (found == 0) {
    return ffi::Unexpected(ffi::Error(
        ffi::ErrorCode::kUnimplemented,
        std::string("cuBLASLt has no ") + m.name + " algorithm for D " + std::to_string(m.d_rows) + " x " +
            std::to_string(m.d_cols) + " (column-major, op(A) " + (m.ta ? "T" : "N") + ", op(B) " +
            (m.tb ? "T" : "N") + ", k " + std::to_string(m.ta ? m.a_rows : m.a_cols) +
            ") in this dtype on this device"));
  }
  p.algo = result.algo;
  p.workspace = result.workspaceSize;
  return p;
}

// The matmul enqueued on `stream` for `device`, in `dtype`; cuBLASLt's workspace from
// allocate(bytes) (nullptr: none). Shared by the FFI handlers and the host entries.
template <typename Allocate>
ffi::Error Run(cudaStream_t stream, int32_t device, int dtype, const Gemm &m, Allocate allocate) {
  if (api.matmul == nullptr) return ffi::Error::Internal("cuBLASLt is not loaded (zoo_cublaslt_init)");

  std::lock_guard<std::mutex> lock(mu);
  StreamContext context(stream);
  auto found = handles.find(device);
  if (found == handles.end()) {
    Handle h = nullptr;
    if (auto e = Check(api.create(&h), "create"); e.failure()) return e;
    found = handles.emplace(device, h).first;
  }
  Handle handle = found->second;

  const int64_t fields[] = {m.epilogue,     m.ta,          m.tb,         static_cast<int64_t>(m.a_rows),
                            static_cast<int64_t>(m.a_cols), static_cast<int64_t>(m.b_rows),
                            static_cast<int64_t>(m.b_cols), static_cast<int64_t>(m.d_rows),
                            static_cast<int64_t>(m.d_cols), m.aux_ld,      dtype,        device,
                            alignment(m.bias), alignment(m.aux), alignment(m.a), alignment(m.b), alignment(m.d)};
  std::string key(reinterpret_cast<const char *>(fields), sizeof(fields));
  auto cached = plans.find(key);
  if (cached == plans.end()) {
    auto plan = build(handle, dtype, m);
    if (plan.has_error()) return plan.error();
    cached = plans.emplace(key, plan.value()).first;
  }
  Plan &plan = cached->second;
  // this call's pointers (the plan was picked for ones aligned alike)
  if (auto e = Check(api.desc_set(plan.desc, DESC_BIAS_POINTER, &m.bias, sizeof(m.bias)), "bias pointer");
      e.failure()) {
    return e;
  }
  if (m.aux != nullptr) {
    if (auto e = Check(api.desc_set(plan.desc, DESC_AUX_POINTER, &m.aux, sizeof(m.aux)), "aux pointer"); e.failure()) {
      return e;
    }
  }
  void *workspace = nullptr;
  if (plan.workspace > 0) {
    workspace = allocate(plan.workspace);
    if (workspace == nullptr) {
      return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                        "no scratch memory for cuBLASLt's workspace (" + std::to_string(plan.workspace) + " bytes)");
    }
  }
  const float one = 1.0f, zero = 0.0f;
  return Check(api.matmul(handle, plan.desc, &one, m.a, plan.a, m.b, plan.b, &zero, m.d, plan.d, m.d, plan.d,
                          &plan.algo, workspace, plan.workspace, stream),
               "matmul");
}

// dz = (g @ w^T) * GELU'(z), dbias = its column sums (row-major g [M, K], z and dz [M, N], dbias
// [N]; w [N, K], or with w_kn its transpose [K, N]: then op(A) is N, TransformerEngine's form of
// this matmul); N and K multiples of 8 (the aux leading dimension, 16-byte rows), else an error.
ffi::ErrorOr<Gemm> DgeluGemm(int64_t M, int64_t N, int64_t K, bool w_kn, const void *g, const void *w, const void *z,
                             void *dz, void *dbias) {
  if (N % 8 != 0 || K % 8 != 0) {
    return ffi::Unexpected(
        ffi::Error::InvalidArgument("N and K must be multiples of 8 (cuBLASLt's aux leading dimension)"));
  }
  const auto m = static_cast<uint64_t>(M), n = static_cast<uint64_t>(N), k = static_cast<uint64_t>(K);
  Gemm gemm = w_kn ? Gemm{"DGELU_BGRAD", EPILOGUE_DGELU_BGRAD, OP_N, OP_N, n, k, k, m, n, m, w, g, dz, dbias}
                   : Gemm{"DGELU_BGRAD", EPILOGUE_DGELU_BGRAD, OP_T, OP_N, k, n, k, m, n, m, w, g, dz, dbias};
  gemm.aux = z;
  gemm.aux_ld = N;
  return gemm;
}

// The weight gradient and db = dy's column sums (row-major x [M, I], dy [M, F], db [F]): with
// EPILOGUE_BGRADB into dw [F, I] transposed, with EPILOGUE_BGRADA into dw [I, F]; I and F
// multiples of 8 (16-byte rows), else an error.
ffi::ErrorOr<Gemm> WgradGemm(uint32_t epilogue, int64_t M, int64_t I, int64_t F, const void *x, const void *dy,
                             void *dw, void *db) {
  if (I % 8 != 0 || F % 8 != 0) {
    return ffi::Unexpected(ffi::Error::InvalidArgument("I and F must be multiples of 8 (16-byte rows)"));
  }
  const auto m = static_cast<uint64_t>(M), i = static_cast<uint64_t>(I), f = static_cast<uint64_t>(F);
  if (epilogue == EPILOGUE_BGRADB) return Gemm{"BGRADB", epilogue, OP_N, OP_T, i, m, f, m, i, f, x, dy, dw, db};
  if (epilogue == EPILOGUE_BGRADA) return Gemm{"BGRADA", epilogue, OP_N, OP_T, f, m, i, m, f, i, dy, x, dw, db};
  return ffi::Unexpected(ffi::Error::InvalidArgument("epilogue must be BGRADB (512) or BGRADA (256), got " +
                                                     std::to_string(epilogue)));
}

// cuBLASLt's type for a buffer's element type (bfloat16, float16), or -1
int CudaType(ffi::DataType t) {
  return t == ffi::DataType::BF16 ? CUDA_R_16BF : t == ffi::DataType::F16 ? CUDA_R_16F : -1;
}

// XLA's scratch allocator as Run's allocate
auto FromScratch(ffi::ScratchAllocator &scratch) {
  return [&scratch](size_t bytes) -> void * { return zoo_cuda::AlignedScratch(scratch, bytes); };
}

ffi::Error DgeluImpl(cudaStream_t stream, ffi::ScratchAllocator &scratch, int32_t device, ffi::AnyBuffer g,
                     ffi::AnyBuffer w, ffi::AnyBuffer z, ffi::Result<ffi::AnyBuffer> &dz,
                     ffi::Result<ffi::AnyBuffer> &dbias, int32_t w_kn) {
  auto gd = g.dimensions(), wd = w.dimensions(), zd = z.dimensions();
  if (gd.size() != 2 || wd.size() != 2 || zd.size() != 2 || wd[w_kn ? 0 : 1] != gd[1] || zd[0] != gd[0] ||
      zd[1] != wd[w_kn ? 1 : 0]) {
    return ffi::Error::InvalidArgument("want g [M, K], w [N, K] (w_kn: [K, N]) and z [M, N]");
  }
  const int dtype = CudaType(z.element_type());
  if (dtype < 0) return ffi::Error::InvalidArgument("cuBLASLt's DGELU epilogue here takes bfloat16 or float16");
  if (g.element_type() != z.element_type() || w.element_type() != z.element_type() ||
      dz->element_type() != z.element_type() || dbias->element_type() != z.element_type()) {
    return ffi::Error::InvalidArgument("g, w, z, dz and dbias must share a dtype");
  }
  auto m = DgeluGemm(gd[0], zd[1], gd[1], w_kn != 0, g.untyped_data(), w.untyped_data(), z.untyped_data(),
                     dz->untyped_data(), dbias->untyped_data());
  if (m.has_error()) return m.error();
  return Run(stream, device, dtype, m.value(), FromScratch(scratch));
}

ffi::Error Dgelu(cudaStream_t stream, ffi::ScratchAllocator scratch, int32_t device, ffi::AnyBuffer g,
                 ffi::AnyBuffer w, ffi::AnyBuffer z, ffi::Result<ffi::AnyBuffer> dz, ffi::Result<ffi::AnyBuffer> dbias,
                 int32_t w_kn) {
  return zoo_cuda::Guarded("cuBLASLt DGELU",
                           [&] { return DgeluImpl(stream, scratch, device, g, w, z, dz, dbias, w_kn); });
}

ffi::Error WgradImpl(cudaStream_t stream, ffi::ScratchAllocator &scratch, int32_t device, ffi::AnyBuffer x,
                     ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> &dw, ffi::Result<ffi::AnyBuffer> &db,
                     int32_t epilogue) {
  auto xd = x.dimensions(), yd = dy.dimensions(), wd = dw->dimensions();
  const bool b = epilogue == EPILOGUE_BGRADB;
  if (xd.size() != 2 || yd.size() != 2 || xd[0] != yd[0] || wd.size() != 2 || wd[b ? 0 : 1] != yd[1] ||
      wd[b ? 1 : 0] != xd[1]) {
    return ffi::Error::InvalidArgument("want x [M, I] and dy [M, F] -> dw [F, I] (BGRADB) or [I, F] (BGRADA)");
  }
  const int dtype = CudaType(x.element_type());
  if (dtype < 0) return ffi::Error::InvalidArgument("cuBLASLt's BGRADB epilogue here takes bfloat16 or float16");
  if (dy.element_type() != x.element_type() || dw->element_type() != x.element_type() ||
      db->element_type() != x.element_type()) {
    return ffi::Error::InvalidArgument("x, dy, dw and db must share a dtype");
  }
  auto m = WgradGemm(static_cast<uint32_t>(epilogue), xd[0], xd[1], yd[1], x.untyped_data(), dy.untyped_data(),
                     dw->untyped_data(), db->untyped_data());
  if (m.has_error()) return m.error();
  return Run(stream, device, dtype, m.value(), FromScratch(scratch));
}

ffi::Error Wgrad(cudaStream_t stream, ffi::ScratchAllocator scratch, int32_t device, ffi::AnyBuffer x,
                 ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw, ffi::Result<ffi::AnyBuffer> db, int32_t epilogue) {
  return zoo_cuda::Guarded("cuBLASLt weight gradient",
                           [&] { return WgradImpl(stream, scratch, device, x, dy, dw, db, epilogue); });
}

// a host entry's result: 1, or 0 with the reason in `error`
int64_t OnHost(int dtype, ffi::ErrorOr<Gemm> m, char *error, int64_t error_size) {
  std::vector<char> workspace;
  auto e = m.has_error() ? m.error() : Run(nullptr, -1, dtype, m.value(), [&](size_t bytes) -> void * {
    workspace.resize(bytes);
    return workspace.data();
  });
  if (e.success()) return 1;
  std::snprintf(error, static_cast<size_t>(error_size), "%s", e.message().c_str());
  return 0;
}

template <typename F>
bool find(F &fn, const char *name) {
  fn = reinterpret_cast<F>(dlsym(library, name));
  return fn != nullptr;
}

}  // namespace

// the library's entry points (it is built with -fvisibility=hidden)
#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooCublasLtDgelu, Dgelu,
                              zoo_cuda::BindOnStream()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("w_kn"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooCublasLtWgrad, Wgrad,
                              zoo_cuda::BindOnStream()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("epilogue"));

// Finds cuBLASLt: the library JAX's CUDA plugin loaded (by soname), else `path`. Returns its
// version (cublasLtGetVersion), or 0 with the reason in `error`.
extern "C" int64_t zoo_cublaslt_init(const char *path, char *error, int64_t error_size) {
  std::lock_guard<std::mutex> lock(mu);
  std::string why;
  if (library == nullptr) {
    library = zoo_cuda::OpenLibrary("cuBLASLt", {"libcublasLt.so.13", "libcublasLt.so.12"}, path, why);
  }
  if (library == nullptr) return zoo_cuda::Fail(error, error_size, why);
  const bool all = find(api.create, "cublasLtCreate") && find(api.version, "cublasLtGetVersion") &&
                   find(api.desc_create, "cublasLtMatmulDescCreate") &&
                   find(api.desc_set, "cublasLtMatmulDescSetAttribute") &&
                   find(api.layout_create, "cublasLtMatrixLayoutCreate") &&
                   find(api.pref_create, "cublasLtMatmulPreferenceCreate") &&
                   find(api.pref_set, "cublasLtMatmulPreferenceSetAttribute") &&
                   find(api.heuristic, "cublasLtMatmulAlgoGetHeuristic") && find(api.matmul, "cublasLtMatmul");
  find(api.status_string, "cublasLtGetStatusString");
  find(api.pref_destroy, "cublasLtMatmulPreferenceDestroy");
  if (!all) {
    api = Api{};
    return zoo_cuda::Fail(error, error_size, "the loaded cuBLASLt lacks a function this call uses");
  }
  return static_cast<int64_t>(api.version());
}

// The same matmuls with no FFI and no stream, for tests/ops/test_cublaslt.py to drive the code
// above against a stand-in cuBLASLt on the host: return 1, or 0 with the reason in `error`.
extern "C" int64_t zoo_cublaslt_dgelu_host(int64_t dtype, int64_t w_kn, int64_t M, int64_t N, int64_t K,
                                           const void *g, const void *w, const void *z, void *dz, void *dbias,
                                           char *error, int64_t error_size) {
  return OnHost(static_cast<int>(dtype), DgeluGemm(M, N, K, w_kn != 0, g, w, z, dz, dbias), error, error_size);
}

extern "C" int64_t zoo_cublaslt_wgrad_host(int64_t dtype, int64_t epilogue, int64_t M, int64_t I, int64_t F,
                                           const void *x, const void *dy, void *dw, void *db, char *error,
                                           int64_t error_size) {
  return OnHost(static_cast<int>(dtype), WgradGemm(static_cast<uint32_t>(epilogue), M, I, F, x, dy, dw, db), error,
                error_size);
}

#pragma GCC visibility pop
