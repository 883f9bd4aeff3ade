// The MLP's GELU backward in cuBLASLt's matmul epilogue (DGELU_BGRAD), as an XLA FFI custom call.
//
// dz = (g @ w^T) * GELU'(z) and dbias = the column sums of dz, in one cuBLASLt matmul: g [M, K]
// (the proj output's gradient), w [N, K] (the proj kernel, Flax's [in, out] read as [N, K]),
// z [M, N] (the GELU's input) -> dz [M, N] and dbias [N], all in one dtype (bfloat16 or float16;
// cuBLASLt writes the bias gradient in the output's type, summed in float32). XLA has no
// DGELU epilogue: its form writes g @ w^T, then a pass reads that and z again (zoo.ops.matmul_gelu).
//
// In cuBLASLt's column-major terms the row-major arrays are transposed: D = dz^T (N x M, ld N)
// = op(A) B with A = w's memory (K x N, ld K, transposed), B = g's memory (K x M, ld K); the
// aux input is z's memory (N x M, ld N); the bias gradient has D's N rows, summed over its M
// columns.
//
// No CUDA header or library is needed to build it: the few cuBLASLt and driver declarations it
// uses are written out below (their values from cublasLt.h, cublas_api.h and library_types.h of
// CUDA 13; checked against those headers by tests/ops/test_cublaslt.py where they are found),
// and libcublasLt is found at run time: the copy JAX's CUDA plugin loaded (XLA's matmuls use
// it), else the path zoo.ops.cublaslt passes.

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

// The descriptors for these shapes and pointers' alignments, and the algorithm cuBLASLt's
// heuristic picks for them (its first).
ffi::ErrorOr<Plan> build(Handle handle, int dtype, int64_t M, int64_t N, int64_t K, void *bias, const void *aux) {
  Plan p;
  const int ta = OP_T, tb = OP_N;
  const uint32_t epilogue = EPILOGUE_DGELU_BGRAD;
  const int64_t ld = N;
  Status status = 0;
  const char *step = "";
  auto ok = [&](Status s, const char *what) {  // the first failure kept, with its step
    if (status == 0 && s != 0) status = s, step = what;
    return status == 0;
  };
  bool good = ok(api.desc_create(&p.desc, COMPUTE_32F, CUDA_R_32F), "matmul descriptor");
  for (auto [attr, value, size] : {std::tuple<int, const void *, size_t>{DESC_TRANSA, &ta, sizeof(ta)},
                                   {DESC_TRANSB, &tb, sizeof(tb)},
                                   {DESC_EPILOGUE, &epilogue, sizeof(epilogue)},
                                   {DESC_BIAS_POINTER, &bias, sizeof(bias)},
                                   {DESC_AUX_POINTER, &aux, sizeof(aux)},
                                   {DESC_AUX_LD, &ld, sizeof(ld)}}) {
    good = good && ok(api.desc_set(p.desc, attr, value, size), "matmul descriptor attribute");
  }
  good = good && ok(api.layout_create(&p.a, dtype, K, N, K), "layout of w") &&
         ok(api.layout_create(&p.b, dtype, K, M, K), "layout of g") &&
         ok(api.layout_create(&p.d, dtype, N, M, N), "layout of dz");
  Pref pref = nullptr;
  good = good && ok(api.pref_create(&pref), "preference") &&
         ok(api.pref_set(pref, PREF_MAX_WORKSPACE_BYTES, &WORKSPACE, sizeof(WORKSPACE)), "preference");
  HeuristicResult result{};
  int found = 0;
  good = good && ok(api.heuristic(handle, p.desc, p.a, p.b, p.d, p.d, pref, 1, &result, &found), "heuristic");
  if (pref != nullptr && api.pref_destroy) api.pref_destroy(pref);
  if (!good) return ffi::Unexpected(ffi::Error::Internal(why(step, status)));
  if (found == 0) {
    return ffi::Unexpected(ffi::Error(ffi::ErrorCode::kUnimplemented,
                                      "cuBLASLt has no DGELU_BGRAD algorithm for M=" + std::to_string(M) +
                                          " N=" + std::to_string(N) + " K=" + std::to_string(K) +
                                          " in this dtype on this device"));
  }
  p.algo = result.algo;
  p.workspace = result.workspaceSize;
  return p;
}

// dz = (g @ w^T) * GELU'(z), dbias = its column sums, enqueued on `stream` for `device` (row-major
// g [M, K], w [N, K], z and dz [M, N], dbias [N], all of `dtype`); cuBLASLt's workspace from
// allocate(bytes) (nullptr: none). Shared by the FFI handler and zoo_cublaslt_dgelu_host.
template <typename Allocate>
ffi::Error Run(cudaStream_t stream, int32_t device, int dtype, int64_t M, int64_t N, int64_t K, const void *g,
               const void *w, const void *z, void *dz, void *dbias, Allocate allocate) {
  if (N % 8 != 0 || K % 8 != 0) {
    return ffi::Error::InvalidArgument("N and K must be multiples of 8 (cuBLASLt's aux leading dimension)");
  }
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

  void *bias = dbias, *out = dz;
  const void *aux = z, *a = w, *b = g;
  const int64_t fields[] = {M, N, K, dtype, device, alignment(bias), alignment(aux), alignment(a), alignment(b),
                            alignment(out)};
  std::string key(reinterpret_cast<const char *>(fields), sizeof(fields));
  auto cached = plans.find(key);
  if (cached == plans.end()) {
    auto plan = build(handle, dtype, M, N, K, bias, aux);
    if (plan.has_error()) return plan.error();
    cached = plans.emplace(key, plan.value()).first;
  }
  Plan &plan = cached->second;
  // this call's pointers (the plan was picked for ones aligned alike)
  if (auto e = Check(api.desc_set(plan.desc, DESC_BIAS_POINTER, &bias, sizeof(bias)), "bias pointer"); e.failure()) {
    return e;
  }
  if (auto e = Check(api.desc_set(plan.desc, DESC_AUX_POINTER, &aux, sizeof(aux)), "aux pointer"); e.failure()) {
    return e;
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
  return Check(api.matmul(handle, plan.desc, &one, a, plan.a, b, plan.b, &zero, out, plan.d, out, plan.d, &plan.algo,
                          workspace, plan.workspace, stream),
               "matmul");
}

ffi::Error DgeluImpl(cudaStream_t stream, ffi::ScratchAllocator &scratch, int32_t device, ffi::AnyBuffer g,
                     ffi::AnyBuffer w, ffi::AnyBuffer z, ffi::Result<ffi::AnyBuffer> &dz,
                     ffi::Result<ffi::AnyBuffer> &dbias) {
  auto gd = g.dimensions(), wd = w.dimensions(), zd = z.dimensions();
  if (gd.size() != 2 || wd.size() != 2 || zd.size() != 2 || wd[1] != gd[1] || zd[0] != gd[0] || zd[1] != wd[0]) {
    return ffi::Error::InvalidArgument("want g [M, K], w [N, K] and z [M, N]");
  }
  int dtype;
  if (z.element_type() == ffi::DataType::BF16) {
    dtype = CUDA_R_16BF;
  } else if (z.element_type() == ffi::DataType::F16) {
    dtype = CUDA_R_16F;
  } else {
    return ffi::Error::InvalidArgument("cuBLASLt's DGELU epilogue here takes bfloat16 or float16");
  }
  if (g.element_type() != z.element_type() || w.element_type() != z.element_type() ||
      dz->element_type() != z.element_type() || dbias->element_type() != z.element_type()) {
    return ffi::Error::InvalidArgument("g, w, z, dz and dbias must share a dtype");
  }
  const int64_t M = gd[0], K = gd[1], N = wd[0];
  return Run(stream, device, dtype, M, N, K, g.untyped_data(), w.untyped_data(), z.untyped_data(), dz->untyped_data(),
             dbias->untyped_data(), [&](size_t bytes) -> void * {
               auto memory = scratch.Allocate(bytes, 256);
               return memory.has_value() ? *memory : nullptr;
             });
}

ffi::Error Dgelu(cudaStream_t stream, ffi::ScratchAllocator scratch, int32_t device, ffi::AnyBuffer g,
                 ffi::AnyBuffer w, ffi::AnyBuffer z, ffi::Result<ffi::AnyBuffer> dz,
                 ffi::Result<ffi::AnyBuffer> dbias) {
  return zoo_cuda::Guarded("cuBLASLt DGELU", [&] { return DgeluImpl(stream, scratch, device, g, w, z, dz, dbias); });
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
                                  .Ret<ffi::AnyBuffer>());

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

// The same matmul with no FFI and no stream, for tests/ops/test_cublaslt.py to drive the code above
// against a stand-in cuBLASLt on the host: returns 1, or 0 with the reason in `error`.
extern "C" int64_t zoo_cublaslt_dgelu_host(int64_t dtype, int64_t M, int64_t N, int64_t K, const void *g,
                                           const void *w, const void *z, void *dz, void *dbias, char *error,
                                           int64_t error_size) {
  std::vector<char> workspace;
  auto e = Run(nullptr, -1, static_cast<int>(dtype), M, N, K, g, w, z, dz, dbias, [&](size_t bytes) -> void * {
    workspace.resize(bytes);
    return workspace.data();
  });
  if (e.success()) return 1;
  std::snprintf(error, static_cast<size_t>(error_size), "%s", e.message().c_str());
  return 0;
}

#pragma GCC visibility pop
