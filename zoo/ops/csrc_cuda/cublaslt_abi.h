// The part of cuBLASLt's C ABI that cublaslt.cc uses, written out so that it builds without
// CUDA's headers (the values are cublasLt.h's, cublas_api.h's and library_types.h's of CUDA 12 and
// 13; tests/ops/test_cublaslt.py checks them against those headers where it finds them).
#pragma once

#include <cstddef>
#include <cstdint>

namespace zoo_lt {

using Status = int;  // cublasStatus_t; 0 = CUBLAS_STATUS_SUCCESS
using Handle = void *;
using Desc = void *;
using Layout = void *;
using Pref = void *;
struct Algo {
  uint64_t data[8];
};
struct HeuristicResult {
  Algo algo;
  size_t workspaceSize;
  Status state;
  float wavesCount;
  int reserved[4];
};
constexpr int CUDA_R_32F = 0, CUDA_R_16F = 2, CUDA_R_16BF = 14;
constexpr int COMPUTE_32F = 68;
constexpr int OP_N = 0, OP_T = 1;
constexpr int DESC_TRANSA = 3, DESC_TRANSB = 4, DESC_EPILOGUE = 7, DESC_BIAS_POINTER = 8, DESC_AUX_POINTER = 11,
              DESC_AUX_LD = 12;
constexpr uint32_t EPILOGUE_DGELU_BGRAD = 208, EPILOGUE_BGRADA = 256, EPILOGUE_BGRADB = 512;
constexpr int PREF_MAX_WORKSPACE_BYTES = 1;

}  // namespace zoo_lt
