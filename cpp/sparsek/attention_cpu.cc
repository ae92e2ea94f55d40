// SparseK attention forward and backward on the CPU.
//
// One work item per (batch, kv head); its N/K query heads run together so that every gathered
// key row serves the whole group. Queries are visited in order while SelectedSet keeps T_i up
// to date (one push/pop per query at most), so query i costs O((window + k_select) * D) and a
// row never touches the other S - window - k_select keys: the cost is linear in S.
//
// Per query the visited keys are the window (gate 1) then the selected keys outside the window
// (gate m_ij = clip(u_j - tau_i, 0, 1)); the softmax weights are g_ij exp(s_ij - max_i).
#include <cmath>
#include <limits>
#include <type_traits>

#include "common/cpu_math.h"
#include "sparsek/sparsek_cpu.h"

namespace jax_sparsek::sparsek {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Eight independent partial sums so that the loop vectorizes without reassociating floats.
inline float Dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int c = 0; c < 8; ++c) acc[c] += a[d + c] * b[d + c];
  float total = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; d < n; ++d) total += a[d] * b[d];
  return total;
}

// y += alpha * x
inline void Axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t d = 0; d < n; ++d) y[d] += alpha * x[d];
}


// Strides of the [B, S, K, *] and [B, T, N, *] layouts.
struct Layout {
  const Problem& p;
  int64_t key(int64_t b, int64_t j, int64_t h, int64_t width) const {
    return ((b * p.S + j) * p.K + h) * width;
  }
  int64_t query(int64_t b, int64_t i, int64_t h, int64_t width) const {
    return ((b * p.T + i) * p.N + h) * width;
  }
};

// Float rows of one operand: float32 inputs are read in place, 16-bit ones converted into a
// per-query buffer.
template <typename T>
struct FloatRows {
  const T* base;
  std::vector<float> converted;
  // Row pointers for `rows`, each `width` floats at base + offset(row).
  template <typename Offset>
  void Collect(const std::vector<int32_t>& rows, int64_t width, Offset offset,
               std::vector<const float*>* out) {
    out->resize(rows.size());
    if constexpr (std::is_same_v<T, float>) {
      for (size_t l = 0; l < rows.size(); ++l) (*out)[l] = base + offset(rows[l]);
    } else {
      converted.resize(rows.size() * width);
      for (size_t l = 0; l < rows.size(); ++l) {
        const T* src = base + offset(rows[l]);
        float* dst = &converted[l * width];
        for (int64_t d = 0; d < width; ++d) dst[d] = ToFloat(src[d]);
        (*out)[l] = dst;
      }
    }
  }
};

template <typename T>
inline void LoadRow(const T* src, int64_t n, float* dst) {
  for (int64_t d = 0; d < n; ++d) dst[d] = ToFloat(src[d]);
}

// The keys query i visits with their gates, and float views of their k and v rows.
template <typename T>
struct KeyBlock {
  std::vector<int32_t> index;
  std::vector<float> gate;
  std::vector<uint8_t> soft;  // selected with 0 < m_ij < 1: its gate depends on the scores
  std::vector<const float*> k, v;
  FloatRows<T> k_rows, v_rows;
  int64_t len = 0;

  KeyBlock(const T* k_in, const T* v_in) : k_rows{k_in, {}}, v_rows{v_in, {}} {}

  void Gather(const Problem& p, const Layout& at, int64_t b, int64_t h, int64_t i,
              const SelectedSet& selected, const float* u, float tau) {
    index.clear();
    gate.clear();
    soft.clear();
    int64_t lo, hi;
    p.WindowRange(i, &lo, &hi);
    for (int64_t j = lo; j < hi; ++j) {
      index.push_back(int32_t(j));
      gate.push_back(1.0f);
      soft.push_back(0);
    }
    for (int32_t j : selected.members()) {
      if (j >= lo && j < hi) continue;  // the window's gate wins
      const float m = std::min(std::max(u[j] - tau, 0.0f), 1.0f);  // tau = -inf gives 1
      if (!(m > 0.0f)) continue;
      index.push_back(j);
      gate.push_back(m);
      soft.push_back(InSupport(u[j], tau) ? 1 : 0);
    }
    len = int64_t(index.size());
    k_rows.Collect(index, p.D, [&](int32_t j) { return at.key(b, j, h, p.D); }, &k);
    v_rows.Collect(index, p.Dv, [&](int32_t j) { return at.key(b, j, h, p.Dv); }, &v);
  }
};

std::vector<float> ScoresOf(const Problem& p, const float* scores, int64_t b, int64_t h) {
  std::vector<float> u(p.S);
  for (int64_t j = 0; j < p.S; ++j) u[j] = scores[(b * p.S + j) * p.K + h];
  return u;
}

template <typename T>
JSK_MULTIVERSION void ForwardItem(const Problem& p, int64_t b, int64_t h, const T* q, const T* k,
                                  const T* v, const float* scores, const float* tau,
                                  const int32_t* kth, T* o, float* lse) {
  const Layout at{p};
  const int64_t G = p.group(), D = p.D, Dv = p.Dv;
  const std::vector<float> u = ScoresOf(p, scores, b, h);
  const float* tau_row = tau + (b * p.K + h) * p.T;
  const int32_t* kth_row = kth + (b * p.K + h) * p.T;
  SelectedSet selected(u.data());
  KeyBlock<T> keys(k, v);
  std::vector<float> qf(D), logits, weights, acc(Dv);
  for (int64_t i = 0; i < p.T; ++i) {
    selected.Advance(p.NumCandidates(i), kth_row[i]);
    keys.Gather(p, at, b, h, i, selected, u.data(), tau_row[i]);
    const int64_t len = keys.len;
    logits.resize(len);
    weights.resize(len);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t head = h * G + g;
      T* o_row = o + at.query(b, i, head, Dv);
      float* lse_out = lse + (b * p.N + head) * p.T + i;
      if (len == 0) {  // no visible key: zero output
        for (int64_t d = 0; d < Dv; ++d) o_row[d] = FromFloat<T>(0.0f);
        *lse_out = kNegInf;
        continue;
      }
      LoadRow(q + at.query(b, i, head, D), D, qf.data());
      float row_max = kNegInf;
      for (int64_t l = 0; l < len; ++l) {
        logits[l] = p.scale * Dot(qf.data(), keys.k[l], D);
        row_max = std::max(row_max, logits[l]);
      }
      // Weights g_ij exp(s_ij - max); every listed gate is positive, so sum > 0.
      for (int64_t l = 0; l < len; ++l) weights[l] = keys.gate[l] * FastExp(logits[l] - row_max);
      float sum = 0.0f;
      for (int64_t l = 0; l < len; ++l) sum += weights[l];
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t l = 0; l < len; ++l) Axpy(weights[l], keys.v[l], acc.data(), Dv);
      const float inv = 1.0f / sum;
      for (int64_t d = 0; d < Dv; ++d) o_row[d] = FromFloat<T>(acc[d] * inv);
      *lse_out = row_max + std::log(sum);
    }
  }
}

// Backward of one (batch, kv head). With P_ij = g_ij exp(s_ij - lse_i) and
// delta_i = do_i . o_i:  dv_j += P_ij do_i,  dS_ij = P_ij (do_i . v_j - delta_i),
// dq_i += scale dS_ij k_j,  dk_j += scale dS_ij q_i.
// Scores: for a selected key with 0 < m_ij < 1, dL/dm_ij = exp(s_ij - lse_i)(do_i . v_j - delta_i)
// reaches u_j directly and, through tau_i, every candidate l in M_i = {tau_i < u_l < tau_i + 1}
// by -G_i / |M_i| with G_i the sum of those dL/dm_ij (dtau_i/du_l = 1/|M_i| on M_i).
template <typename T>
JSK_MULTIVERSION void BackwardItem(const Problem& p, int64_t b, int64_t h, const T* q, const T* k,
                                   const T* v, const float* scores, const float* tau,
                                   const int32_t* kth, const T* o, const float* lse,
                                   const T* dout, T* dq, T* dk, T* dv, float* dscores) {
  const Layout at{p};
  const int64_t G = p.group(), D = p.D, Dv = p.Dv, S = p.S;
  const std::vector<float> u = ScoresOf(p, scores, b, h);
  const float* tau_row = tau + (b * p.K + h) * p.T;
  const int32_t* kth_row = kth + (b * p.K + h) * p.T;
  std::vector<float> dk_acc(S * D, 0.0f), dv_acc(S * Dv, 0.0f);
  std::vector<double> du(S, 0.0), mask_grad(p.T, 0.0);  // mask_grad[i] = G_i
  SelectedSet selected(u.data());
  KeyBlock<T> keys(k, v);
  std::vector<float> qf(D), dof(Dv), of(Dv), dq_acc(D), expo, dp;
  for (int64_t i = 0; i < p.T; ++i) {
    selected.Advance(p.NumCandidates(i), kth_row[i]);
    keys.Gather(p, at, b, h, i, selected, u.data(), tau_row[i]);
    const int64_t len = keys.len;
    expo.resize(len);
    dp.resize(len);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t head = h * G + g;
      T* dq_row = dq + at.query(b, i, head, D);
      const float row_lse = lse[(b * p.N + head) * p.T + i];
      if (len == 0 || !(row_lse > kNegInf)) {
        for (int64_t d = 0; d < D; ++d) dq_row[d] = FromFloat<T>(0.0f);
        continue;
      }
      LoadRow(q + at.query(b, i, head, D), D, qf.data());
      LoadRow(dout + at.query(b, i, head, Dv), Dv, dof.data());
      LoadRow(o + at.query(b, i, head, Dv), Dv, of.data());
      const float delta = Dot(dof.data(), of.data(), Dv);
      // exp(s_ij - lse_i) and do_i . v_j - delta_i for every visited key.
      for (int64_t l = 0; l < len; ++l) {
        expo[l] = p.scale * Dot(qf.data(), keys.k[l], D) - row_lse;
        dp[l] = Dot(dof.data(), keys.v[l], Dv) - delta;
      }
      for (int64_t l = 0; l < len; ++l) expo[l] = FastExp(expo[l]);
      std::fill(dq_acc.begin(), dq_acc.end(), 0.0f);
      double row_mask_grad = 0.0;
      for (int64_t l = 0; l < len; ++l) {
        const int64_t j = keys.index[l];
        const float pij = keys.gate[l] * expo[l];
        const float ds = pij * dp[l];
        Axpy(pij, dof.data(), &dv_acc[j * Dv], Dv);
        Axpy(ds, keys.k[l], dq_acc.data(), D);
        Axpy(p.scale * ds, qf.data(), &dk_acc[j * D], D);
        if (keys.soft[l]) {  // dL/dm_ij
          const double dm = double(expo[l]) * double(dp[l]);
          du[j] += dm;
          row_mask_grad += dm;
        }
      }
      mask_grad[i] += row_mask_grad;
      for (int64_t d = 0; d < D; ++d) dq_row[d] = FromFloat<T>(p.scale * dq_acc[d]);
    }
  }

  // The tau term. tau_i is nondecreasing in i, so the queries with l in M_i (u_l - 1 < tau_i <
  // u_l, and l a candidate of query i) form a contiguous range [first_l, end_l): binary search
  // gives it, a difference array gives every |M_i|, prefix sums of G_i / |M_i| give the sums.
  if (p.causal) {
    std::vector<int64_t> first(S), end(S), support_size(p.T + 1, 0);
    for (int64_t l = 0; l < S; ++l) {
      const double ul = u[l];
      const float* lo = std::upper_bound(tau_row, tau_row + p.T, ul - 1.0,
                                         [](double x, float t) { return x < double(t); });
      const float* hi = std::lower_bound(tau_row, tau_row + p.T, ul,
                                         [](float t, double x) { return double(t) < x; });
      // Query i has l as a candidate iff p_i - window >= l.
      const int64_t first_candidate = std::max<int64_t>(0, l + p.window - (p.S - p.T));
      first[l] = std::min<int64_t>(p.T, std::max<int64_t>(lo - tau_row, first_candidate));
      end[l] = std::max<int64_t>(hi - tau_row, first[l]);
      support_size[first[l]] += 1;
      support_size[end[l]] -= 1;
    }
    std::vector<double> prefix(p.T + 1, 0.0);
    int64_t size = 0;
    for (int64_t i = 0; i < p.T; ++i) {
      size += support_size[i];
      prefix[i + 1] = prefix[i] + (size > 0 ? mask_grad[i] / double(size) : 0.0);
    }
    for (int64_t l = 0; l < S; ++l) du[l] -= prefix[end[l]] - prefix[first[l]];
  } else if (p.T > 0) {  // one tau shared by all queries
    const float t = tau_row[0];
    int64_t size = 0;
    double total = 0.0;
    for (int64_t l = 0; l < S; ++l) size += InSupport(u[l], t);
    for (int64_t i = 0; i < p.T; ++i) total += mask_grad[i];
    if (size > 0)
      for (int64_t l = 0; l < S; ++l)
        if (InSupport(u[l], t)) du[l] -= total / double(size);
  }

  for (int64_t j = 0; j < S; ++j) {
    for (int64_t d = 0; d < D; ++d) dk[at.key(b, j, h, D) + d] = FromFloat<T>(dk_acc[j * D + d]);
    for (int64_t d = 0; d < Dv; ++d) dv[at.key(b, j, h, Dv) + d] = FromFloat<T>(dv_acc[j * Dv + d]);
    dscores[(b * S + j) * p.K + h] = float(du[j]);
  }
}

}  // namespace

template <typename T>
void ForwardCpu(const Problem& p, const T* q, const T* k, const T* v, const float* scores,
                const float* tau, const int32_t* kth, T* o, float* lse) {
  ParallelFor(p.B * p.K, [&](int64_t item) {
    ForwardItem(p, item / p.K, item % p.K, q, k, v, scores, tau, kth, o, lse);
  });
}

template <typename T>
void BackwardCpu(const Problem& p, const T* q, const T* k, const T* v, const float* scores,
                 const float* tau, const int32_t* kth, const T* o, const float* lse,
                 const T* dout, T* dq, T* dk, T* dv, float* dscores) {
  ParallelFor(p.B * p.K, [&](int64_t item) {
    BackwardItem(p, item / p.K, item % p.K, q, k, v, scores, tau, kth, o, lse, dout, dq, dk, dv,
                 dscores);
  });
}

#define JSK_INSTANTIATE(T)                                                                     \
  template void ForwardCpu<T>(const Problem&, const T*, const T*, const T*, const float*,      \
                              const float*, const int32_t*, T*, float*);                      \
  template void BackwardCpu<T>(const Problem&, const T*, const T*, const T*, const float*,     \
                               const float*, const int32_t*, const T*, const float*, const T*, \
                               T*, T*, T*, float*);
JSK_INSTANTIATE(float)
JSK_INSTANTIATE(bf16_t)
JSK_INSTANTIATE(f16_t)
#undef JSK_INSTANTIATE

}  // namespace jax_sparsek::sparsek
