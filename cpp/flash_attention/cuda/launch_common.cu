// Host helpers shared by the launchers: TMA tensor maps (the driver's cuTensorMapEncodeTiled,
// fetched through the runtime so the extension needs no libcuda link), the per-device opt-in
// to large dynamic shared memory, and the forward dispatcher (with the empty-key case).
#include <cudaTypedefs.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <set>
#include <utility>

#include "attention_kernels.h"
#include "ptx.cuh"

namespace jax_sparsek::cuda {
namespace {

PFN_cuTensorMapEncodeTiled_v12000 EncodeTiledFn(std::string* error) {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = []() -> PFN_cuTensorMapEncodeTiled_v12000 {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                         &status) != cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      cudaGetLastError();  // clear the sticky-free error so later launches report their own
      return nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  if (!fn) *error = "the CUDA driver does not provide cuTensorMapEncodeTiled (driver too old?)";
  return fn;
}

}  // namespace

bool MakeTensorMap(CUtensorMap* map, const void* ptr, bool bf16, int batch, int seq, int heads,
                   int dim, std::string* error) {
  auto encode = EncodeTiledFn(error);
  if (!encode) return false;
  const cuuint64_t sizes[4] = {cuuint64_t(dim), cuuint64_t(seq), cuuint64_t(heads),
                               cuuint64_t(batch)};
  // Byte strides of dims 1..3 of [batch, seq, heads, dim] (heads interleaved in each row).
  const cuuint64_t strides[3] = {cuuint64_t(heads) * dim * 2, cuuint64_t(dim) * 2,
                                 cuuint64_t(seq) * heads * dim * 2};
  const cuuint32_t box[4] = {kBoxCols, kBoxRows, 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  CUresult r = encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                      4, const_cast<void*>(ptr), sizes, strides, box, elem_strides,
                      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    *error = "cuTensorMapEncodeTiled failed with CUresult " + std::to_string(int(r)) +
             " (tensor [" + std::to_string(batch) + ", " + std::to_string(seq) + ", " +
             std::to_string(heads) + ", " + std::to_string(dim) + "])";
    return false;
  }
  return true;
}

cudaError_t EnsureSmem(const void* kernel, int bytes) {
  static std::mutex mu;
  static std::set<std::pair<int, const void*>> done;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(mu);
  if (done.count({device, kernel})) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess) done.insert({device, kernel});
  return err;
}

namespace {
__global__ void fill_kernel(float* out, int64_t n, float value) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = value;
  }
}
}  // namespace

cudaError_t LaunchFlashForward(const FwdArgs& a, FwdKernel kernel, cudaStream_t stream,
                               std::string* error) {
  const AttentionDims& d = a.dims;
  const int64_t rows = int64_t(d.B) * d.T * d.N;
  if (rows == 0) return cudaSuccess;
  if (d.S == 0) {  // no keys at all: o = 0, lse = -inf
    cudaError_t err = cudaMemsetAsync(a.o, 0, rows * d.D * 2, stream);
    if (err != cudaSuccess) return err;
    fill_kernel<<<unsigned(std::min<int64_t>((rows + 255) / 256, 4096)), 256, 0, stream>>>(
        a.lse, rows, -INFINITY);
    return cudaGetLastError();
  }
  switch (kernel) {
    case FwdKernel::kMmaSync: return LaunchFwdMma(a, stream, error);
    case FwdKernel::kWgmmaNoPingPong: return LaunchFwdWgmma(a, false, stream, error);
    case FwdKernel::kWgmma: break;
  }
  return LaunchFwdWgmma(a, true, stream, error);
}

}  // namespace jax_sparsek::cuda
