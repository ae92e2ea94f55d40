// Helpers shared by every op's FFI handlers: dtype dispatch, 16-bit float conversion for
// the CPU kernels, shape checks that return FFI errors (never abort), and a parallel-for.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace jax_sparsek {

namespace ffi = xla::ffi;

// ---- 16-bit floats on the CPU: storage types with float conversion ----------------
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

inline float FloatFromBits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t BitsFromFloat(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float ToFloat(float x) { return x; }
inline float ToFloat(bf16_t x) { return FloatFromBits(uint32_t(x.bits) << 16); }
inline float ToFloat(f16_t x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000) << 16;
  uint32_t exp = (x.bits >> 10) & 0x1f, man = x.bits & 0x3ff;
  if (exp == 0x1f) return FloatFromBits(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    if (man == 0) return FloatFromBits(sign);
    // Subnormal half: value = man * 2^-24.
    float v = float(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return FloatFromBits(sign | ((exp + 112) << 23) | (man << 13));
}

template <typename T> T FromFloat(float x);
template <> inline float FromFloat<float>(float x) { return x; }
template <> inline bf16_t FromFloat<bf16_t>(float x) {
  uint32_t u = BitsFromFloat(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40)};  // quiet nan
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {uint16_t(u >> 16)};
}
template <> inline f16_t FromFloat<f16_t>(float x) {
  uint32_t u = BitsFromFloat(x);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return {uint16_t(sign | 0x7e00)};       // nan
  if (u >= 0x477ff000u) return {uint16_t(sign | 0x7c00)};      // overflow (incl. rounding) -> inf
  if (u < 0x38800000u) {                                         // subnormal or zero in half
    if (u < 0x33000000u) return {sign};                          // below half of min subnormal
    const uint32_t exp = u >> 23, man = (u & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exp;                            // 14..24 -> aligns to 2^-24 units
    uint32_t half = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return {uint16_t(sign | half)};
  }
  uint32_t h = ((u >> 13) - (112u << 10));
  const uint32_t rem = u & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return {uint16_t(sign | h)};
}

// Calls fn(T{}) with T the storage type of a floating dtype; returns false for others.
template <typename Fn>
bool DispatchFloat(ffi::DataType dtype, Fn&& fn) {
  switch (dtype) {
    case ffi::DataType::F32: fn(float{}); return true;
    case ffi::DataType::BF16: fn(bf16_t{}); return true;
    case ffi::DataType::F16: fn(f16_t{}); return true;
    default: return false;
  }
}

inline const char* DtypeName(ffi::DataType dtype) {
  switch (dtype) {
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::F64: return "float64";
    case ffi::DataType::S32: return "int32";
    case ffi::DataType::S64: return "int64";
    case ffi::DataType::PRED: return "bool";
    default: return "an unsupported dtype";
  }
}

// ---- shape checks ------------------------------------------------------------------
inline std::string ShapeString(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// Returns an InvalidArgument error unless `buf` has rank `rank`; fills `out` with its dims.
template <size_t R>
ffi::Error GetDims(const char* what, const ffi::AnyBuffer& buf, int64_t (&out)[R]) {
  auto dims = buf.dimensions();
  if (dims.size() != R) {
    return ffi::Error::InvalidArgument(std::string(what) + " must have rank " + std::to_string(R) +
                                       ", got shape " + ShapeString(dims));
  }
  for (size_t i = 0; i < R; ++i) out[i] = dims[i];
  return ffi::Error::Success();
}

inline ffi::Error ExpectShape(const char* what, const ffi::AnyBuffer& buf,
                              std::initializer_list<int64_t> expected) {
  auto dims = buf.dimensions();
  bool ok = dims.size() == expected.size();
  for (size_t i = 0; ok && i < expected.size(); ++i) ok = dims[i] == expected.begin()[i];
  if (ok) return ffi::Error::Success();
  std::string want = "[";
  size_t i = 0;
  for (int64_t d : expected) want += (i++ ? ", " : "") + std::to_string(d);
  return ffi::Error::InvalidArgument(std::string(what) + " must have shape " + want + "], got " +
                                     ShapeString(dims));
}

inline ffi::Error ExpectDtype(const char* what, const ffi::AnyBuffer& buf, ffi::DataType dtype) {
  if (buf.element_type() == dtype) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string(what) + " must be " + DtypeName(dtype) + ", got " +
                                     DtypeName(buf.element_type()));
}

inline ffi::Error CheckScale(float scale) {
  if (std::isfinite(scale)) return ffi::Error::Success();
  return ffi::Error::InvalidArgument("scale must be finite, got " + std::to_string(scale));
}

#define JSK_RETURN_IF_ERROR(expr)          \
  do {                                     \
    ::xla::ffi::Error jsk_err_ = (expr);   \
    if (jsk_err_.failure()) return jsk_err_; \
  } while (0)

// ---- CPU parallelism -----------------------------------------------------------------
// Runs fn(i) for i in [0, n) on up to hardware_concurrency threads (work items are
// coarse: one (batch, head) or (batch, kv head) each), interleaved for load balance.
template <typename Fn>
void ParallelFor(int64_t n, Fn&& fn) {
  const int64_t threads = std::min<int64_t>(n, std::max(1u, std::thread::hardware_concurrency()));
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  auto worker = [&](int64_t t) { for (int64_t i = t; i < n; i += threads) fn(i); };
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(worker, t);
  worker(0);
  for (auto& th : pool) th.join();
}

}  // namespace jax_sparsek
