// What zoo's CUDA FFI calls (cudnn_attention.cc, cublaslt.cc) share: the stream's context
// made current for a call, and C++ exceptions kept from crossing into XLA. Needs no CUDA header:
// the driver is reached through dlopen, and cudaStream_t is declared as CUDA's driver_types.h
// declares it.
#pragma once

#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <initializer_list>
#include <string>

#include "xla/ffi/api/ffi.h"

struct CUstream_st;
typedef struct CUstream_st *cudaStream_t;

namespace zoo_cuda {

// The stream's CUDA context made current for the call, through the driver library that is always
// loaded where a GPU runs (a library creates its handle for, and picks algorithms by, the current
// device; XLA's thread need not have the stream's device current). Nothing where there is no driver.
class StreamContext {
 public:
  explicit StreamContext(cudaStream_t stream) {
    using Result = int;  // CUresult; 0 = CUDA_SUCCESS
    static void *driver = dlopen("libcuda.so.1", RTLD_NOW);
    static auto get_ctx =
        driver ? reinterpret_cast<Result (*)(cudaStream_t, void **)>(dlsym(driver, "cuStreamGetCtx")) : nullptr;
    static auto push = driver ? reinterpret_cast<Result (*)(void *)>(dlsym(driver, "cuCtxPushCurrent")) : nullptr;
    static auto pop = driver ? reinterpret_cast<Result (*)(void **)>(dlsym(driver, "cuCtxPopCurrent")) : nullptr;
    pop_ = pop;
    void *ctx = nullptr;
    pushed_ = get_ctx && push && pop && get_ctx(stream, &ctx) == 0 && push(ctx) == 0;
  }
  ~StreamContext() {
    void *ctx;
    if (pushed_) pop_(&ctx);
  }
  StreamContext(const StreamContext &) = delete;
  StreamContext &operator=(const StreamContext &) = delete;

 private:
  int (*pop_)(void **) = nullptr;
  bool pushed_ = false;
};

// body() with any C++ exception turned into an FFI error naming `what` (an exception must not
// cross into XLA: the cuDNN frontend throws where it cannot load a CUDA library).
template <typename Body>
xla::ffi::Error Guarded(const char *what, Body &&body) {
  try {
    return body();
  } catch (const std::exception &e) {
    return xla::ffi::Error::Internal(std::string(what) + ": " + e.what());
  } catch (...) {
    return xla::ffi::Error::Internal(std::string(what) + ": an unknown C++ exception");
  }
}

// `bytes` of XLA's scratch memory at a 256-byte boundary (cuBLASLt's and cuDNN's workspace
// alignment), or nullptr. XLA's FFI allocator refuses any alignment above 16 ("Unsupported
// alignment", xla/ffi/ffi_api.cc: kMaxAlignment), so the block is asked for 255 bytes longer at
// that alignment and the pointer rounded up; the allocator frees it when the handler returns.
constexpr size_t kScratchAlignment = 256;
inline void *AlignedScratch(xla::ffi::ScratchAllocator &scratch, size_t bytes) {
  auto memory = scratch.Allocate(bytes + kScratchAlignment - 1, 16);
  if (!memory.has_value()) return nullptr;
  auto address = reinterpret_cast<uintptr_t>(*memory);
  return reinterpret_cast<void *>((address + kScratchAlignment - 1) / kScratchAlignment * kScratchAlignment);
}

// The binding every call's handler starts with: XLA's stream, its scratch allocator (the
// library's workspace), the device's number; the call's arguments and attributes follow.
inline auto BindOnStream() {
  return xla::ffi::Ffi::Bind()
      .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
      .Ctx<xla::ffi::ScratchAllocator>()
      .Ctx<xla::ffi::DeviceOrdinal>();
}

// A CUDA library (`what`): the copy already loaded under one of `sonames` (JAX's CUDA plugin's),
// else the one at `path` (none: ""); nullptr with the reason in `why`.
inline void *OpenLibrary(const char *what, std::initializer_list<const char *> sonames, const char *path,
                         std::string &why) {
  void *handle = nullptr;
  for (const char *name : sonames) {
    if (handle == nullptr) handle = dlopen(name, RTLD_NOW | RTLD_NOLOAD);
  }
  if (handle == nullptr && path != nullptr && path[0] != '\0') handle = dlopen(path, RTLD_NOW);
  if (handle == nullptr) {
    const char *reason = dlerror();
    std::string names;
    for (const char *name : sonames) names += (names.empty() ? "" : " or ") + std::string(name);
    why = "cannot load " + std::string(what) + " (" + names + "): " + (reason ? reason : "not loaded");
  }
  return handle;
}

// An init's failure: `why` into the caller's buffer, and 0 to return.
inline int64_t Fail(char *error, int64_t error_size, const std::string &why) {
  std::snprintf(error, static_cast<size_t>(error_size), "%s", why.c_str());
  return 0;
}

}  // namespace zoo_cuda
