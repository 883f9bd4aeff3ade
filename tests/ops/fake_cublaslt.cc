// A stand-in for libcublasLt on the host, for tests/ops/test_cublaslt.py: the functions
// zoo/ops/csrc_cuda/cublaslt.cc calls, computing what cuBLASLt's documentation says they
// compute, on host memory, bfloat16 only. Written from the documentation (column-major matrices
// with leading dimensions; D = op(A) op(B), op(A) m x k, op(B) k x n, D m x n; the DGELU_BGRAD
// epilogue: D := D * GELU'(aux), aux m x n with its own leading dimension, bias[i] := sum over
// the n columns of D's row i; the BGRADB epilogue, "the bias gradient of the input matrix B":
// bias[j] := sum over the k rows of op(B)'s column j, one per column of D; BGRADA, of A:
// bias[i] := sum over the k columns of op(A)'s row i, one per row of D), not from the caller's
// row-major mapping, so the test checks that mapping. It refuses what the real library would: a layout whose sizes do not match the op's
// m, n, k, an aux leading dimension below m or not a multiple of 8, a missing pointer.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct Desc {
  int compute = 0, scale = 0, transa = 0, transb = 0;
  uint32_t epilogue = 1;
  void *bias = nullptr;
  const void *aux = nullptr;
  int64_t aux_ld = 0;
};
struct Layout {
  int type;
  uint64_t rows, cols;
  int64_t ld;
};
struct Algo {
  uint64_t data[8];
};
struct HeuristicResult {
  Algo algo;
  size_t workspaceSize;
  int state;
  float wavesCount;
  int reserved[4];
};

constexpr int SUCCESS = 0, INVALID_VALUE = 7, NOT_SUPPORTED = 15;
constexpr int BF16 = 14;
constexpr size_t WORKSPACE = 4096;  // asked of the caller, to exercise its workspace

float from_bf16(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t to_bf16(float f) {  // round to nearest even
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

float gelu_grad(float z) {  // GPT-2's tanh GELU, differentiated
  const float c = 0.7978845608028654f, a = 0.044715f;
  float t = std::tanh(c * (z + a * z * z * z));
  return 0.5f * (1 + t) + 0.5f * z * (1 - t * t) * c * (1 + 3 * a * z * z);
}

}  // namespace

extern "C" {

int cublasLtCreate(void **handle) {
  static int one;
  *handle = &one;
  return SUCCESS;
}
size_t cublasLtGetVersion() { return 130802; }
const char *cublasLtGetStatusString(int) { return "the stand-in refused"; }

int cublasLtMatmulDescCreate(Desc **desc, int compute, int scale) {
  *desc = new Desc{compute, scale};
  return SUCCESS;
}

int cublasLtMatmulDescSetAttribute(Desc *d, int attr, const void *buf, size_t size) {
  switch (attr) {
    case 3: std::memcpy(&d->transa, buf, size); break;
    case 4: std::memcpy(&d->transb, buf, size); break;
    case 7: std::memcpy(&d->epilogue, buf, size); break;
    case 8: std::memcpy(&d->bias, buf, size); break;
    case 11: std::memcpy(&d->aux, buf, size); break;
    case 12: std::memcpy(&d->aux_ld, buf, size); break;
    default: return INVALID_VALUE;
  }
  return SUCCESS;
}

int cublasLtMatrixLayoutCreate(Layout **layout, int type, uint64_t rows, uint64_t cols, int64_t ld) {
  if (ld < static_cast<int64_t>(rows)) return INVALID_VALUE;
  *layout = new Layout{type, rows, cols, ld};
  return SUCCESS;
}

int cublasLtMatmulPreferenceCreate(void **pref) {
  static int one;
  *pref = &one;
  return SUCCESS;
}
int cublasLtMatmulPreferenceSetAttribute(void *, int, const void *, size_t) { return SUCCESS; }
int cublasLtMatmulPreferenceDestroy(void *) { return SUCCESS; }

// op(A) m x k, op(B) k x n, D m x n from the layouts, or false where they disagree
static bool sizes(const Desc *d, const Layout *a, const Layout *b, const Layout *out, uint64_t &m, uint64_t &n,
                  uint64_t &k) {
  m = d->transa ? a->cols : a->rows;
  k = d->transa ? a->rows : a->cols;
  uint64_t kb = d->transb ? b->cols : b->rows;
  n = d->transb ? b->rows : b->cols;
  return kb == k && out->rows == m && out->cols == n;
}

int cublasLtMatmulAlgoGetHeuristic(void *, Desc *d, Layout *a, Layout *b, Layout *c, Layout *out, void *, int count,
                                   HeuristicResult *results, int *found) {
  uint64_t m, n, k;
  *found = 0;
  if (count < 1 || !sizes(d, a, b, out, m, n, k) || c->rows != out->rows || c->cols != out->cols) {
    return INVALID_VALUE;
  }
  if (a->type != BF16 || b->type != BF16 || out->type != BF16 || d->compute != 68 || d->scale != 0) {
    return NOT_SUPPORTED;
  }
  if (d->epilogue == 208 && (d->aux_ld < static_cast<int64_t>(m) || d->aux_ld % 8)) return INVALID_VALUE;
  std::memset(results, 0, sizeof(HeuristicResult));
  results->workspaceSize = WORKSPACE;
  *found = 1;
  return SUCCESS;
}

int cublasLtMatmul(void *, Desc *d, const float *alpha, const void *A, Layout *a, const void *B, Layout *b,
                   const float *beta, const void *C, Layout *c, void *D, Layout *out, const Algo *algo,
                   void *workspace, size_t workspace_size, void *) {
  uint64_t m, n, k;
  if (!sizes(d, a, b, out, m, n, k) || !algo || !A || !B || !D || C != D || c != out || *beta != 0.0f) {
    return INVALID_VALUE;
  }
  if (workspace_size < WORKSPACE || !workspace) return INVALID_VALUE;
  const bool dgelu = d->epilogue == 208, bgradb = d->epilogue == 512, bgrada = d->epilogue == 256;
  if (d->epilogue != 1 && !dgelu && !bgradb && !bgrada) return NOT_SUPPORTED;
  if ((dgelu && (!d->aux || !d->bias)) || ((bgradb || bgrada) && !d->bias)) return INVALID_VALUE;
  auto *pa = static_cast<const uint16_t *>(A), *pb = static_cast<const uint16_t *>(B);
  auto *pd = static_cast<uint16_t *>(D);
  auto *aux = static_cast<const uint16_t *>(d->aux);
  std::vector<float> bias(m, 0.0f);
  for (uint64_t j = 0; j < n; ++j) {
    for (uint64_t i = 0; i < m; ++i) {
      float acc = 0;
      for (uint64_t l = 0; l < k; ++l) {
        float x = from_bf16(d->transa ? pa[l + i * a->ld] : pa[i + l * a->ld]);
        float y = from_bf16(d->transb ? pb[j + l * b->ld] : pb[l + j * b->ld]);
        acc += x * y;
      }
      acc *= *alpha;
      if (dgelu) {
        acc *= gelu_grad(from_bf16(aux[i + j * d->aux_ld]));
        bias[i] += acc;
      }
      pd[i + j * out->ld] = to_bf16(acc);
    }
  }
  if (dgelu) {
    for (uint64_t i = 0; i < m; ++i) static_cast<uint16_t *>(d->bias)[i] = to_bf16(bias[i]);
  }
  if (bgradb) {
    for (uint64_t j = 0; j < n; ++j) {
      float sum = 0;
      for (uint64_t l = 0; l < k; ++l) sum += from_bf16(d->transb ? pb[j + l * b->ld] : pb[l + j * b->ld]);
      static_cast<uint16_t *>(d->bias)[j] = to_bf16(sum);
    }
  }
  if (bgrada) {
    for (uint64_t i = 0; i < m; ++i) {
      float sum = 0;
      for (uint64_t l = 0; l < k; ++l) sum += from_bf16(d->transa ? pa[l + i * a->ld] : pa[i + l * a->ld]);
      static_cast<uint16_t *>(d->bias)[i] = to_bf16(sum);
    }
  }
  return SUCCESS;
}

}  // extern "C"
