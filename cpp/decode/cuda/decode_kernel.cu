// Decode attention on the GPU: one query per (batch, head) against R cache entries. The work
// is bandwidth: each K/V row is read once for all the query heads of its GQA group (up to four
// per CTA), with 16-byte loads straight to registers (kUnroll rows of K and V in flight per
// lane), dot products and an online softmax on the CUDA cores, and the entries split over
// enough CTAs to fill the GPU; a second kernel merges the splits' (o, lse).
#include <cmath>

#include "decode/cuda/decode_kernel.h"
#include "decode/splits.h"
#include "flash_attention/cuda/attention_kernels.h"  // kLog2e, kLn2
#include "flash_attention/cuda/ptx.cuh"

namespace jax_sparsek::cuda::decode {
namespace {

constexpr int kWarps = 4;
constexpr int kHeadsPerCta = 4;  // query heads sharing each K/V load
constexpr int kUnroll = 4;       // rows of K and of V in flight per lane
constexpr int kSplitAlign = int(jax_sparsek::decode::kSplitEntries);  // the handlers' bound
constexpr int kMinCtasPerSm = 4;  // 16 warps an SM: at most 128 registers a thread

template <bool kBf16>
__device__ __forceinline__ void unpack8(const uint4& x, float (&f)[8]) {
  const uint32_t w[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = unpack2<kBf16>(w[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

// exp2(x - m) that is 0 for an empty state (m = -inf).
__device__ __forceinline__ float rescale(float x, float m) {
  return x == -INFINITY ? 0.0f : fast_exp2(x - m);
}

template <bool kBf16, int kD>
__global__ void __launch_bounds__(kWarps * 32, kMinCtasPerSm) decode_split_kernel(const DecodeParams p, int head_groups,
                                                                   int split_entries) {
  using Elem = typename Elem16<kBf16>::type;
  constexpr int kLanesPerEntry = kD / 8;  // a lane holds 8 elements (16 bytes) of a row
  constexpr int kEntriesPerWarp = 32 / kLanesPerEntry;
  constexpr int kStride = kWarps * kEntriesPerWarp;  // entries one CTA step covers
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slot = lane / kLanesPerEntry, col = (lane % kLanesPerEntry) * 8;

  // Work item (batch, kv head, split, head group), head group fastest: the CTAs that read the
  // same rows run side by side and share them in L2.
  int item = blockIdx.x;
  const int head_group = item % head_groups;
  item /= head_groups;
  const int split = item % p.splits;
  item /= p.splits;
  const int kv = item % p.K, b = item / p.K;
  const int group = p.N / p.K;
  const int h0 = kv * group + head_group * kHeadsPerCta;
  const int heads = min(kHeadsPerCta, group - head_group * kHeadsPerCta);
  const int begin = p.key_begin + split * split_entries;
  const int end = min(p.R, begin + split_entries);

  // This lane's 8 columns of each query, scaled into the log2 domain.
  const float q_scale = p.scale * kLog2e;
  float q[kHeadsPerCta][8];
#pragma unroll
  for (int g = 0; g < kHeadsPerCta; ++g) {
    if (g < heads) {
      const Elem* row = static_cast<const Elem*>(p.q) + (int64_t(b) * p.N + h0 + g) * kD + col;
      unpack8<kBf16>(__ldg(reinterpret_cast<const uint4*>(row)), q[g]);
#pragma unroll
      for (int e = 0; e < 8; ++e) q[g][e] *= q_scale;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) q[g][e] = 0.0f;
    }
  }

  // Online softmax state of the entries this lane's slot sees.
  float m[kHeadsPerCta], l[kHeadsPerCta], acc[kHeadsPerCta][8];
#pragma unroll
  for (int g = 0; g < kHeadsPerCta; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.0f;
  }

  const int64_t head_offset = int64_t(b) * p.batch_stride + int64_t(kv) * p.head_stride + col;
  const Elem* k_head = static_cast<const Elem*>(p.k) + head_offset;
  const Elem* v_head = static_cast<const Elem*>(p.v) + head_offset;
  const float* w_head = p.key_weight ? p.key_weight + (int64_t(b) * p.K + kv) * p.R : nullptr;

  // Warp-uniform loop (the dot products reduce across lanes); a lane past `end` or on an entry
  // of weight <= 0 loads nothing and skips the update.
  for (int r0 = begin + warp * kEntriesPerWarp; r0 < end; r0 += kStride * kUnroll) {
    uint4 k_rows[kUnroll], v_rows[kUnroll];
    float w[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int r = r0 + slot + u * kStride;
      w[u] = r < end ? (w_head ? w_head[r] : 1.0f) : 0.0f;
      if (w[u] > 0.0f) {
        k_rows[u] = __ldg(reinterpret_cast<const uint4*>(k_head + r * p.entry_stride));
        v_rows[u] = __ldg(reinterpret_cast<const uint4*>(v_head + r * p.entry_stride));
      } else {
        k_rows[u] = v_rows[u] = make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float kf[8], s[kHeadsPerCta];
      unpack8<kBf16>(k_rows[u], kf);
#pragma unroll
      for (int g = 0; g < kHeadsPerCta; ++g) {
        s[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) s[g] = fmaf(q[g][e], kf[e], s[g]);
#pragma unroll
        for (int off = kLanesPerEntry / 2; off > 0; off /= 2)
          s[g] += __shfl_xor_sync(0xffffffffu, s[g], off);
      }
      if (w[u] > 0.0f) {
        float vf[8];
        unpack8<kBf16>(v_rows[u], vf);
#pragma unroll
        for (int g = 0; g < kHeadsPerCta; ++g) {
          const float m_new = fmaxf(m[g], s[g]);
          const float c = rescale(m[g], m_new), pr = w[u] * fast_exp2(s[g] - m_new);
          l[g] = l[g] * c + pr;
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(acc[g][e], c, pr * vf[e]);
          m[g] = m_new;
        }
      }
    }
  }

  // Merge the warp's slots (lanes kLanesPerEntry apart hold the same columns).
#pragma unroll
  for (int off = kLanesPerEntry; off < 32; off *= 2) {
#pragma unroll
    for (int g = 0; g < kHeadsPerCta; ++g) {
      const float m_other = __shfl_xor_sync(0xffffffffu, m[g], off);
      const float l_other = __shfl_xor_sync(0xffffffffu, l[g], off);
      const float m_new = fmaxf(m[g], m_other);
      const float c_self = rescale(m[g], m_new), c_other = rescale(m_other, m_new);
      l[g] = l[g] * c_self + l_other * c_other;
#pragma unroll
      for (int e = 0; e < 8; ++e)
        acc[g][e] = acc[g][e] * c_self + __shfl_xor_sync(0xffffffffu, acc[g][e], off) * c_other;
      m[g] = m_new;
    }
  }

  // Merge the warps through shared memory, then write o and lse (one split) or the split's
  // partial row.
  __shared__ float sm_m[kWarps][kHeadsPerCta], sm_l[kWarps][kHeadsPerCta];
  __shared__ float sm_acc[kWarps][kHeadsPerCta][kD];
  if (lane < kLanesPerEntry) {
#pragma unroll
    for (int g = 0; g < kHeadsPerCta; ++g) {
#pragma unroll
      for (int e = 0; e < 8; ++e) sm_acc[warp][g][col + e] = acc[g][e];
      if (lane == 0) {
        sm_m[warp][g] = m[g];
        sm_l[warp][g] = l[g];
      }
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < heads * kD; idx += kWarps * 32) {
    const int g = idx / kD, d = idx % kD;
    float m_all = -INFINITY;
#pragma unroll
    for (int w2 = 0; w2 < kWarps; ++w2) m_all = fmaxf(m_all, sm_m[w2][g]);
    float l_all = 0.0f, a_all = 0.0f;
#pragma unroll
    for (int w2 = 0; w2 < kWarps; ++w2) {
      const float c = rescale(sm_m[w2][g], m_all);
      l_all += sm_l[w2][g] * c;
      a_all += sm_acc[w2][g][d] * c;
    }
    const int64_t row = int64_t(b) * p.N + h0 + g;
    const float out = l_all > 0.0f ? a_all / l_all : 0.0f;
    const float lse2 = l_all > 0.0f ? m_all + log2f(l_all) : -INFINITY;
    if (p.splits == 1) {
      static_cast<Elem*>(p.o)[row * kD + d] = Elem(out);
      if (d == 0) p.lse[row] = lse2 * kLn2;
    } else {
      float* part = p.partials + (row * p.splits + split) * (kD + 1);
      part[d] = out;
      if (d == 0) part[kD] = lse2;
    }
  }
}

// One CTA per (batch, query head), one thread per column: o and lse from the splits' rows.
template <bool kBf16>
__global__ void decode_merge_kernel(const DecodeParams p) {
  using Elem = typename Elem16<kBf16>::type;
  const int64_t row = blockIdx.x;
  const int d = threadIdx.x, stride = p.D + 1;
  const float* part = p.partials + row * p.splits * stride;
  float m_all = -INFINITY;
  for (int s = 0; s < p.splits; ++s) m_all = fmaxf(m_all, part[s * stride + p.D]);
  float l_all = 0.0f, a_all = 0.0f;
  for (int s = 0; s < p.splits; ++s) {
    const float c = rescale(part[s * stride + p.D], m_all);
    l_all += c;
    a_all += c * part[s * stride + d];
  }
  static_cast<Elem*>(p.o)[row * p.D + d] = Elem(l_all > 0.0f ? a_all / l_all : 0.0f);
  if (d == 0) p.lse[row] = l_all > 0.0f ? (m_all + log2f(l_all)) * kLn2 : -INFINITY;
}

template <bool kBf16, int kD>
cudaError_t Launch(const DecodeParams& p, cudaStream_t stream) {
  const int group = p.N / p.K;
  const int head_groups = (group + kHeadsPerCta - 1) / kHeadsPerCta;
  const int entries = max(0, p.R - p.key_begin);
  const int per_split = (entries + p.splits - 1) / p.splits;
  const int split_entries = max(kSplitAlign, (per_split + kSplitAlign - 1) / kSplitAlign * kSplitAlign);
  const int64_t ctas = int64_t(p.B) * p.K * p.splits * head_groups;
  if (ctas >= (int64_t(1) << 31)) return cudaErrorInvalidConfiguration;
  decode_split_kernel<kBf16, kD><<<unsigned(ctas), kWarps * 32, 0, stream>>>(p, head_groups, split_entries);
  if (p.splits > 1) decode_merge_kernel<kBf16><<<unsigned(int64_t(p.B) * p.N), kD, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchDecode(const DecodeParams& p, bool bf16, cudaStream_t stream) {
  if (p.D == 64) return bf16 ? Launch<true, 64>(p, stream) : Launch<false, 64>(p, stream);
  return bf16 ? Launch<true, 128>(p, stream) : Launch<false, 128>(p, stream);
}

}  // namespace jax_sparsek::cuda::decode
