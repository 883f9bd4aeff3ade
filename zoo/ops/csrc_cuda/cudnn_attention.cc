// cuDNN's flash attention forward called directly, as an XLA FFI custom call (CUDA).
//
// Why not jax.nn.dot_product_attention(implementation="cudnn"): XLA runs that custom call
// through its own cuDNN thunk, which zero-fills every output buffer before the kernel
// (xla/service/gpu/thunk_emitter.cc: should_memzero = IsCustomCallTofMHA; CuDnnThunk, on the
// stream or as memset nodes of a command buffer). For a forward that is the whole output,
// [B, T, N, D], written twice: at B4 N16 T1024 D128 bf16 a 16 MiB memset (plus two small ones)
// before a ~60 us kernel (benchmarks/results/README.md). Here the same cuDNN graph (the
// frontend's SDPA node, which PyTorch's cuDNN attention also builds) runs on XLA's stream with
// nothing before it.
//
// Layouts are the zoo's: q [B, T, N, D], k and v [B, S, K, D] (N % K == 0: cuDNN's grouped-query
// heads), o [B, T, N, D]; bfloat16 or float16. is_causal aligns query i with key i (top-left),
// as jax.nn and zoo.ops.attention do. One graph per (shape, dtype, scale, mask, device) is built
// on first use and cached; its workspace comes from XLA's scratch allocator.
//
// zoo.ops.cudnn_direct compiles this file on first use (g++, against the CUDA, cuDNN and cuDNN
// frontend headers; no CUDA library is linked: the frontend's dynamic loading finds cuDNN and
// the CUDA runtime already loaded by JAX's CUDA plugin) and registers the handler for CUDA.

#define NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING
#define CUDNN_FRONTEND_SKIP_JSON_LIB

#include <cuda.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include <cudnn_frontend.h>

#include "ffi_cuda.h"
#include "xla/ffi/api/ffi.h"

namespace cudnn_frontend {
void *cudnn_dlhandle = nullptr;  // the frontend's dynamic loading looks cuDNN's symbols up here
}

namespace ffi = xla::ffi;
namespace fe = cudnn_frontend;
using zoo_cuda::StreamContext;

namespace {

constexpr int64_t Q_UID = 1, K_UID = 2, V_UID = 3, O_UID = 4;

struct Plan {
  std::shared_ptr<fe::graph::Graph> graph;
  int64_t workspace = 0;
};

std::mutex mu;  // guards the maps, and each handle's stream while a graph is enqueued
std::unordered_map<int32_t, cudnnHandle_t> handles;  // one per device
std::unordered_map<std::string, std::shared_ptr<Plan>> plans;

std::string fe_error(fe::error_t e) { return e.get_message(); }

// The graph for these shapes: q [B, T, N, D], k/v [B, S, K, D], o like q, as cuDNN's (b, h, s, d)
// dims with the zoo's strides.
ffi::ErrorOr<std::shared_ptr<Plan>> build(cudnnHandle_t handle, fe::DataType_t dtype, int64_t B, int64_t T,
                                          int64_t S, int64_t N, int64_t K, int64_t D, float scale,
                                          bool causal) {
  auto graph = std::make_shared<fe::graph::Graph>();
  graph->set_io_data_type(dtype)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  auto tensor = [&](const char *name, int64_t uid, int64_t heads, int64_t len) {
    return graph->tensor(fe::graph::Tensor_attributes()
                             .set_name(name)
                             .set_uid(uid)
                             .set_dim({B, heads, len, D})
                             .set_stride({len * heads * D, D, heads * D, 1}));
  };
  auto q = tensor("q", Q_UID, N, T), k = tensor("k", K_UID, K, S), v = tensor("v", V_UID, K, S);
  auto options = fe::graph::SDPA_attributes().set_name("sdpa").set_generate_stats(false).set_attn_scale(scale);
  if (causal) options.set_causal_mask(true);
  auto [o, stats] = graph->sdpa(q, k, v, options);
  (void)stats;
  o->set_output(true).set_dim({B, N, T, D}).set_stride({T * N * D, D, N * D, 1}).set_uid(O_UID);

  for (auto step : {+[](fe::graph::Graph &g, cudnnHandle_t) { return g.validate(); },
                    +[](fe::graph::Graph &g, cudnnHandle_t h) { return g.build_operation_graph(h); },
                    +[](fe::graph::Graph &g, cudnnHandle_t) { return g.create_execution_plans({fe::HeurMode_t::A}); },
                    +[](fe::graph::Graph &g, cudnnHandle_t h) { return g.check_support(h); },
                    +[](fe::graph::Graph &g, cudnnHandle_t h) { return g.build_plans(h); }}) {
    auto status = step(*graph, handle);
    if (status.is_bad()) return ffi::Unexpected(ffi::Error::Internal("cuDNN SDPA graph: " + fe_error(status)));
  }
  auto plan = std::make_shared<Plan>();
  plan->graph = graph;
  auto status = graph->get_workspace_size(plan->workspace);
  if (status.is_bad()) return ffi::Unexpected(ffi::Error::Internal("cuDNN SDPA workspace: " + fe_error(status)));
  return plan;
}

ffi::Error ForwardImpl(cudaStream_t stream, ffi::ScratchAllocator &scratch, int32_t device, ffi::AnyBuffer q,
                       ffi::AnyBuffer k, ffi::AnyBuffer v, float scale, bool is_causal,
                       ffi::Result<ffi::AnyBuffer> &o) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || v.dimensions().size() != 4) {
    return ffi::Error::InvalidArgument("q, k, v must be [B, T, N, D], [B, S, K, D], [B, S, K, D]");
  }
  fe::DataType_t dtype;
  if (q.element_type() == ffi::DataType::BF16) {
    dtype = fe::DataType_t::BFLOAT16;
  } else if (q.element_type() == ffi::DataType::F16) {
    dtype = fe::DataType_t::HALF;
  } else {
    return ffi::Error::InvalidArgument("cuDNN attention takes bfloat16 or float16");
  }
  if (k.element_type() != q.element_type() || v.element_type() != q.element_type()) {
    return ffi::Error::InvalidArgument("q, k and v must share a dtype");
  }
  const int64_t B = qd[0], T = qd[1], N = qd[2], D = qd[3], S = kd[1], K = kd[2];

  std::lock_guard<std::mutex> lock(mu);
  StreamContext context(stream);
  auto found = handles.find(device);
  if (found == handles.end()) {
    cudnnHandle_t h = nullptr;
    auto create = reinterpret_cast<cudnnStatus_t (*)(cudnnHandle_t *)>(dlsym(fe::cudnn_dlhandle, "cudnnCreate"));
    if (create == nullptr || create(&h) != CUDNN_STATUS_SUCCESS) {
      return ffi::Error::Internal("cudnnCreate failed on device " + std::to_string(device));
    }
    found = handles.emplace(device, h).first;
  }
  cudnnHandle_t handle = found->second;
  auto set_stream = reinterpret_cast<cudnnStatus_t (*)(cudnnHandle_t, cudaStream_t)>(
      dlsym(fe::cudnn_dlhandle, "cudnnSetStream"));
  if (set_stream == nullptr || set_stream(handle, stream) != CUDNN_STATUS_SUCCESS) {
    return ffi::Error::Internal("cudnnSetStream failed");
  }

  const int64_t fields[] = {B, T, S, N, K, D, static_cast<int64_t>(dtype), is_causal, device};
  std::string key(sizeof(fields) + sizeof(scale), '\0');
  std::memcpy(key.data(), fields, sizeof(fields));
  std::memcpy(key.data() + sizeof(fields), &scale, sizeof(scale));
  auto cached = plans.find(key);
  if (cached == plans.end()) {
    auto plan = build(handle, dtype, B, T, S, N, K, D, scale, is_causal);
    if (plan.has_error()) return plan.error();
    cached = plans.emplace(key, plan.value()).first;
  }
  const Plan &plan = *cached->second;

  void *workspace = nullptr;
  if (plan.workspace > 0) {
    workspace = zoo_cuda::AlignedScratch(scratch, static_cast<size_t>(plan.workspace));
    if (workspace == nullptr) {
      return ffi::Error(ffi::ErrorCode::kResourceExhausted, "no scratch memory for cuDNN's workspace (" +
                                           std::to_string(plan.workspace) + " bytes)");
    }
  }
  std::unordered_map<int64_t, void *> pointers = {
      {Q_UID, q.untyped_data()}, {K_UID, k.untyped_data()}, {V_UID, v.untyped_data()}, {O_UID, o->untyped_data()}};
  auto status = plan.graph->execute(handle, pointers, workspace);
  if (status.is_bad()) return ffi::Error::Internal("cuDNN SDPA execute: " + fe_error(status));
  return ffi::Error::Success();
}

ffi::Error Forward(cudaStream_t stream, ffi::ScratchAllocator scratch, int32_t device, ffi::AnyBuffer q,
                   ffi::AnyBuffer k, ffi::AnyBuffer v, float scale, bool is_causal, ffi::Result<ffi::AnyBuffer> o) {
  return zoo_cuda::Guarded("cuDNN attention",
                           [&] { return ForwardImpl(stream, scratch, device, q, k, v, scale, is_causal, o); });
}

}  // namespace

// the library's two entry points (it is built with -fvisibility=hidden)
#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooCudnnAttentionForward, Forward,
                              zoo_cuda::BindOnStream()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<float>("scale")
                                  .Attr<bool>("is_causal")
                                  .Ret<ffi::AnyBuffer>());

// Finds cuDNN for the frontend: the library JAX's CUDA plugin loaded (by its soname), else
// `path`. Returns cuDNN's version (cudnnGetVersion), or 0 with the reason in `error`.
extern "C" int64_t zoo_cudnn_init(const char *path, char *error, int64_t error_size) {
  std::lock_guard<std::mutex> lock(mu);
  std::string why;
  if (fe::cudnn_dlhandle == nullptr) {
    fe::cudnn_dlhandle = zoo_cuda::OpenLibrary("cuDNN", {"libcudnn.so.9"}, path, why);
  }
  if (fe::cudnn_dlhandle == nullptr) return zoo_cuda::Fail(error, error_size, why);
  auto version = reinterpret_cast<size_t (*)()>(dlsym(fe::cudnn_dlhandle, "cudnnGetVersion"));
  if (version == nullptr) return zoo_cuda::Fail(error, error_size, "libcudnn.so.9 has no cudnnGetVersion");
  return static_cast<int64_t>(version());
}

#pragma GCC visibility pop
