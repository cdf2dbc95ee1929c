// Fused CPU kernels for the MaxQ mask (SPEC §2): the hard N:M mask, the exact order statistics of the axis
// queries given a guessed threshold, the soft-mask combination, and the SR-STE decay.
//
// Each kernel streams the weight once; the eager PyTorch path (maxq/masks.py) needs about thirty passes over
// memory for the same result. The tests hold both to the full-sort reference in maxq/reference.py.
//
// Layout: a weight is viewed as [O, I, K] (K = kh * kw; 1 for Linear). N:M blocks are m consecutive input
// channels at fixed (o, k). Filter-axis query sets are the rows o; kernel-axis sets are the columns k.
//
// Built with -fno-trapping-math so that the compiler may if-convert and vectorize the branch-free loops below.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <vector>

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// exp(x): Cephes' single-precision polynomial, branch-free so that loops vectorize (|rel. error| < 3e-7).
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const float k = (x * 1.44269504088896341f + shifter) - shifter;
  float r = x - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  return bits_to_float(float_to_bits(y) + (static_cast<int32_t>(k) << 23));
}

inline float sigmoid_approx(float z) { return 1.0f / (1.0f + exp_approx(-z)); }

void check_float(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous(), what,
              " must be a contiguous float32 CPU tensor");
}

struct Shape {
  int64_t O, I, K, L;
  explicit Shape(const torch::Tensor& w) {
    TORCH_CHECK(w.dim() >= 2 && w.numel() > 0, "weight must be [O, I, ...] and not empty");
    O = w.size(0);
    I = w.size(1);
    K = w.numel() / (O * I);
    L = I * K;
  }
};

// `values` repeated along a row of length L (position idx holds values[idx % K]), so per-column work on a row
// runs as one contiguous, vectorizable loop.
std::vector<float> along_row(const torch::Tensor& values, int64_t K, int64_t L) {
  auto v = values.contiguous();
  TORCH_CHECK(v.numel() == K, "expected one value per kernel position");
  const float* pv = v.data_ptr<float>();
  std::vector<float> out(L);
  for (int64_t idx = 0; idx < L; ++idx) out[idx] = pv[idx % K];
  return out;
}

// ---- pass 1: hard N:M mask, block L1, counts below the guesses -------------------------------------------

// One row: T is scratch for M * B * K floats. The row is first transposed to block-major order
// (T[j][q], q = b * K + k) so that the rank loop runs over all blocks of the row at once and vectorizes.
template <int M>
void nm_row(const float* __restrict__ row, float* __restrict__ keep, float* __restrict__ l1, int64_t B, int64_t K,
            int n, float* __restrict__ T) {
  const int64_t Q = B * K;
  for (int64_t b = 0; b < B; ++b) {
    for (int j = 0; j < M; ++j) {
      const float* src = row + (b * M + j) * K;
      float* dst = T + j * Q + b * K;
      for (int64_t k = 0; k < K; ++k) dst[k] = std::fabs(src[k]);
    }
  }
  if (l1 != nullptr) {  // summed in channel order, as maxq.masks.block_l1
    for (int64_t q = 0; q < Q; ++q) l1[q] = T[q];
    for (int j = 1; j < M; ++j) {
      for (int64_t q = 0; q < Q; ++q) l1[q] += T[j * Q + q];
    }
  }
  float* R = T + M * Q;  // keep flags, block-major
  for (int j = 0; j < M; ++j) {
    const float* aj = T + j * Q;
    float* rj = R + j * Q;
    for (int64_t q = 0; q < Q; ++q) {
      int rank = 0;  // entries that beat entry j of block q: larger, or equal with a lower channel
#pragma GCC unroll 32
      for (int i = 0; i < M; ++i) {
        const float ai = T[i * Q + q];
        rank += static_cast<int>(i < j ? ai >= aj[q] : (i > j && ai > aj[q]));
      }
      rj[q] = static_cast<float>(rank < n);
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    for (int j = 0; j < M; ++j) {
      const float* src = R + j * Q + b * K;
      float* dst = keep + (b * M + j) * K;
      for (int64_t k = 0; k < K; ++k) dst[k] = src[k];
    }
  }
}

void nm_row_generic(const float* row, float* keep, float* l1, int64_t B, int64_t K, int n, int m) {
  std::vector<float> a(m);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < K; ++k) {
      for (int j = 0; j < m; ++j) a[j] = std::fabs(row[(b * m + j) * K + k]);
      if (l1 != nullptr) {
        float s = a[0];
        for (int j = 1; j < m; ++j) s += a[j];
        l1[b * K + k] = s;
      }
      for (int j = 0; j < m; ++j) {
        int rank = 0;
        for (int i = 0; i < m; ++i) rank += static_cast<int>(i < j ? a[i] >= a[j] : (i > j && a[i] > a[j]));
        keep[(b * m + j) * K + k] = static_cast<float>(rank < n);
      }
    }
  }
}

void nm_row_any(const float* row, float* keep, float* l1, int64_t B, int64_t K, int n, int m, float* T) {
  switch (m) {
    case 2: return nm_row<2>(row, keep, l1, B, K, n, T);
    case 4: return nm_row<4>(row, keep, l1, B, K, n, T);
    case 8: return nm_row<8>(row, keep, l1, B, K, n, T);
    case 16: return nm_row<16>(row, keep, l1, B, K, n, T);
    case 32: return nm_row<32>(row, keep, l1, B, K, n, T);
    default: return nm_row_generic(row, keep, l1, B, K, n, m);
  }
}

int32_t count_below(const float* __restrict__ row, int64_t L, float g) {
  int32_t c = 0;
  for (int64_t idx = 0; idx < L; ++idx) c += static_cast<int32_t>(std::fabs(row[idx]) < g);
  return c;
}

void count_below_each(const float* __restrict__ row, int64_t L, const float* __restrict__ g, int32_t* __restrict__ c) {
  for (int64_t idx = 0; idx < L; ++idx) c[idx] += static_cast<int32_t>(std::fabs(row[idx]) < g[idx]);
}

// ---- pass 2: exact order statistics near a guess -----------------------------------------------------------

// The `size` best entries of one query set on one side of the guess g: below it (largest first) or at or above
// it (smallest first); with offset 0 also the smallest entry at or above g.
struct Side {
  bool below;
  int64_t size;
  bool want_min_above;
  float g;
  float lo, hi;  // an entry enters `best` iff lo <= v < hi (narrows as `best` fills)
  float min_above = kInf;
  std::vector<float> best;  // sorted best first

  Side(int64_t offset, float guess)
      : below(offset >= 0), size((offset >= 0 ? offset : -offset) + 1), want_min_above(offset == 0), g(guess) {
    lo = below ? -kInf : guess;
    hi = below ? guess : kInf;
    best.reserve(size + 1);
  }

  void offer(float v) {
    if (v >= lo && v < hi) insert(v);
  }

  void insert(float v) {
    auto pos = below ? std::upper_bound(best.begin(), best.end(), v, std::greater<float>())
                     : std::upper_bound(best.begin(), best.end(), v);
    best.insert(pos, v);
    if (static_cast<int64_t>(best.size()) > size) best.pop_back();
    if (static_cast<int64_t>(best.size()) == size) {
      // Full: a newcomer must now beat the worst kept entry.
      if (below) lo = std::nextafter(best.back(), kInf);
      else hi = best.back();
    }
  }

  void merge(const Side& other) {
    min_above = std::min(min_above, other.min_above);
    for (float v : other.best) offer(v);
  }

  // a(k), a(k+1); false if the counts did not add up (e.g. NaN weights).
  bool resolve(int64_t offset, float* a_k, float* a_k1) const {
    if (static_cast<int64_t>(best.size()) != size) return false;
    if (offset >= 0) {
      *a_k = best[size - 1];  // the (offset+1)-th largest below the guess
      *a_k1 = offset >= 1 ? best[size - 2] : min_above;
      return std::isfinite(*a_k1);
    }
    *a_k = best[size - 2];  // the (-offset)-th smallest at or above the guess
    *a_k1 = best[size - 1];
    return true;
  }
};

// How many of row[0..len) fall in [lo, hi) -- usually none, which keeps the scalar insertion path cold.
int32_t count_in(const float* __restrict__ row, int64_t len, float lo, float hi) {
  int32_t c = 0;
  for (int64_t idx = 0; idx < len; ++idx) {
    const float v = std::fabs(row[idx]);
    c += static_cast<int32_t>(v >= lo) & static_cast<int32_t>(v < hi);
  }
  return c;
}

float min_at_or_above(const float* __restrict__ row, int64_t len, float g) {
  float best = kInf;
#pragma omp simd reduction(min : best)
  for (int64_t idx = 0; idx < len; ++idx) {
    const float v = std::fabs(row[idx]);
    best = std::min(best, v >= g ? v : kInf);
  }
  return best;
}

void min_at_or_above_each(const float* __restrict__ row, int64_t L, const float* __restrict__ g, float* __restrict__ best) {
  for (int64_t idx = 0; idx < L; ++idx) {
    const float v = std::fabs(row[idx]);
    const float c = v >= g[idx] ? v : kInf;
    best[idx] = c < best[idx] ? c : best[idx];
  }
}

int32_t count_in_each(const float* __restrict__ row, int64_t L, const float* __restrict__ lo, const float* __restrict__ hi) {
  int32_t c = 0;
  for (int64_t idx = 0; idx < L; ++idx) {
    const float v = std::fabs(row[idx]);
    c += static_cast<int32_t>(v >= lo[idx]) & static_cast<int32_t>(v < hi[idx]);
  }
  return c;
}

void count_in_each_acc(const float* __restrict__ row, int64_t L, const float* __restrict__ lo,
                       const float* __restrict__ hi, int32_t* __restrict__ cnt) {
  for (int64_t idx = 0; idx < L; ++idx) {
    const float v = std::fabs(row[idx]);
    cnt[idx] += static_cast<int32_t>(v >= lo[idx]) & static_cast<int32_t>(v < hi[idx]);
  }
}

constexpr int64_t kChunk = 32;  // entries per pre-screened chunk of the scalar insertion scan

// ---- pass 3: soft scale -------------------------------------------------------------------------------------

// mrow *= 1 + Q_f + Q_k for one filter row; tkp / lkp hold the kernel thresholds along the row (or are null).
// Branch-free (the sigmoid is computed everywhere, then gated) so the loop vectorizes.
void soft_row(const float* __restrict__ row, float* __restrict__ mrow, int64_t L, float t, float cut,
              const float* __restrict__ tkp, const float* __restrict__ lkp, float inv_tau) {
  const float shift = -t * inv_tau;
  if (tkp != nullptr) {
    for (int64_t idx = 0; idx < L; ++idx) {
      const float a = std::fabs(row[idx]);
      const float qf = static_cast<float>(a > cut) * sigmoid_approx(a * inv_tau + shift);
      const float qk = static_cast<float>(a > lkp[idx]) * sigmoid_approx((a - tkp[idx]) * inv_tau);
      mrow[idx] = mrow[idx] * (1.0f + qf + qk);
    }
  } else {
    for (int64_t idx = 0; idx < L; ++idx) {
      const float a = std::fabs(row[idx]);
      const float qf = static_cast<float>(a > cut) * sigmoid_approx(a * inv_tau + shift);
      mrow[idx] = mrow[idx] * (1.0f + qf);
    }
  }
}

void decay_range(float* __restrict__ g, const float* __restrict__ w, const float* __restrict__ m, int64_t len, float lam) {
  for (int64_t i = 0; i < len; ++i) g[i] += static_cast<float>(m[i] == 0.0f) * (lam * w[i]);
}

}  // namespace

// Pass 1: the hard N:M mask into `keep` (0/1 floats of w's shape), block L1 norms into `l1` ([O, I/m, K], when
// given), and how many entries have |w| < guess in every filter row (guess_f [O]) and kernel column
// (guess_k [K]). Returns {count_f [O], count_k [K]} (int64; empty where no guess was given).
std::vector<torch::Tensor> nm_pass(torch::Tensor w, int64_t n, int64_t m, torch::Tensor keep,
                                   c10::optional<torch::Tensor> l1, c10::optional<torch::Tensor> guess_f,
                                   c10::optional<torch::Tensor> guess_k) {
  check_float(w, "weight");
  check_float(keep, "keep");
  const Shape s(w);
  TORCH_CHECK(m >= 2 && n >= 1 && n < m && s.I % m == 0, "bad N:M pattern for this weight");
  TORCH_CHECK(keep.numel() == w.numel(), "keep must have the weight's shape");
  const int64_t B = s.I / m;
  const float* pw = w.data_ptr<float>();
  float* pk = keep.data_ptr<float>();
  float* pl = nullptr;
  if (l1.has_value()) {
    check_float(*l1, "l1");
    TORCH_CHECK(l1->numel() == s.O * B * s.K, "l1 must have O * I/m * K entries");
    pl = l1->data_ptr<float>();
  }
  const bool has_f = guess_f.has_value(), has_k = guess_k.has_value();
  auto count_f = torch::zeros({has_f ? s.O : 0}, torch::kLong);
  auto count_k = torch::zeros({has_k ? s.K : 0}, torch::kLong);
  torch::Tensor gf;
  if (has_f) {
    gf = guess_f->contiguous();
    check_float(gf, "guess_f");
    TORCH_CHECK(gf.numel() == s.O, "guess_f needs one entry per filter");
  }
  const std::vector<float> gk = has_k ? along_row(*guess_k, s.K, s.L) : std::vector<float>();
  int64_t* cf = count_f.data_ptr<int64_t>();
  int64_t* ck = count_k.data_ptr<int64_t>();
  std::mutex merge;
  at::parallel_for(0, s.O, 1, [&](int64_t o0, int64_t o1) {
    std::vector<int32_t> ck_local(has_k ? s.L : 0, 0);
    std::vector<float> scratch(2 * s.L);
    for (int64_t o = o0; o < o1; ++o) {
      const float* row = pw + o * s.L;
      if (has_f) cf[o] = count_below(row, s.L, gf.data_ptr<float>()[o]);
      if (has_k) count_below_each(row, s.L, gk.data(), ck_local.data());
      nm_row_any(row, pk + o * s.L, pl == nullptr ? nullptr : pl + o * B * s.K, B, s.K, static_cast<int>(n),
                 static_cast<int>(m), scratch.data());
    }
    if (has_k) {
      std::lock_guard<std::mutex> lock(merge);
      for (int64_t idx = 0; idx < s.L; ++idx) ck[idx % s.K] += ck_local[idx];
    }
  });
  return {count_f, count_k};
}

// Pass 2: the exact k-th and (k+1)-th smallest |w| of every query set, given the guesses and the counts of
// pass 1 (offset = count - k says on which side of the guess they lie and how far). axis = 1: the sets are
// the filter rows [O]; axis = 0: the kernel columns [K]. Sets more than `max_offset` ranks off are left
// unresolved (ok = false) for the caller's exact path. `width` (optional, one per set) is where the search
// bracket around the guess starts; pass back the returned width next time. Returns {a_k, a_k1, ok, width}.
std::vector<torch::Tensor> kth_select(torch::Tensor w, int64_t axis, int64_t k, torch::Tensor guess,
                                      torch::Tensor count, int64_t max_offset, c10::optional<torch::Tensor> width) {
  check_float(w, "weight");
  const Shape s(w);
  const int64_t S = axis == 1 ? s.O : s.K;
  auto g = guess.contiguous();
  auto c = count.contiguous();
  check_float(g, "guess");
  TORCH_CHECK(g.numel() == S && c.numel() == S && c.scalar_type() == torch::kLong, "one guess and count per set");
  const float* pg = g.data_ptr<float>();
  const int64_t* pc = c.data_ptr<int64_t>();
  const float* pw = w.data_ptr<float>();
  auto lo = torch::empty({S}, torch::kFloat);
  auto hi = torch::empty({S}, torch::kFloat);
  auto ok = torch::zeros({S}, torch::kBool);
  auto used_width = torch::empty({S}, torch::kFloat);
  float* plo = lo.data_ptr<float>();
  float* phi = hi.data_ptr<float>();
  bool* pok = ok.data_ptr<bool>();
  float* pwidth = used_width.data_ptr<float>();
  torch::Tensor hint;
  if (width.has_value()) {
    hint = width->contiguous();
    check_float(hint, "width");
    TORCH_CHECK(hint.numel() == S, "one bracket width per set");
  }
  // First bracket half-width: last call's (it worked then), else a small share of the guess.
  auto first_width = [&](int64_t set, float g) {
    const float tiny = std::max(g, 1e-30f) * (1.0f / 4096.0f);
    return hint.defined() ? std::max(hint.data_ptr<float>()[set], tiny * (1.0f / 256.0f)) : tiny;
  };
  auto usable = [&](int64_t offset) { return offset <= max_offset && -offset <= max_offset; };

  if (axis == 1) {
    at::parallel_for(0, s.O, 1, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        const int64_t offset = pc[o] - k;
        if (!usable(offset)) continue;
        Side side(offset, pg[o]);
        const float* row = pw + o * s.L;
        if (side.want_min_above) side.min_above = min_at_or_above(row, s.L, side.g);
        // Bracket: widen [g - delta, g) (or [g, g + delta)) until it holds the `size` entries we need, so that
        // the scan below only inserts entries of the answer's neighbourhood.
        pwidth[o] = kInf;
        for (float delta = first_width(o, side.g); delta < kInf; delta *= 4.0f) {
          const float blo = side.below ? side.g - delta : side.g;
          const float bhi = side.below ? side.g : side.g + delta;
          if (count_in(row, s.L, blo, bhi) >= side.size) {
            side.lo = blo;
            side.hi = bhi;
            pwidth[o] = delta;
            break;
          }
          if (side.below ? blo <= 0.0f : bhi > 3.0e38f) break;
        }
        for (int64_t c0 = 0; c0 < s.L; c0 += kChunk) {
          const int64_t len = std::min(kChunk, s.L - c0);
          if (count_in(row + c0, len, side.lo, side.hi) == 0) continue;
          for (int64_t idx = c0; idx < c0 + len; ++idx) side.offer(std::fabs(row[idx]));
        }
        pok[o] = side.resolve(offset, plo + o, phi + o);
      }
    });
    return {lo, hi, ok, used_width};
  }

  // Kernel axis: every set spans all rows. Same bracketing, one pass over the weight per widening round for
  // all columns at once, then a scan that inserts only in-bracket entries.
  std::vector<int64_t> offsets(s.K);
  std::vector<Side> total;
  for (int64_t kk = 0; kk < s.K; ++kk) {
    offsets[kk] = pc[kk] - k;
    total.emplace_back(offsets[kk], pg[kk]);
  }
  std::vector<float> delta(s.K), blo(s.L), bhi(s.L);
  std::vector<char> done(s.K, 0);
  for (int64_t kk = 0; kk < s.K; ++kk) {
    delta[kk] = first_width(kk, pg[kk]);
    pwidth[kk] = kInf;
    done[kk] = !usable(offsets[kk]);
  }
  for (int round = 0; round < 64; ++round) {
    bool all_done = true;
    for (int64_t kk = 0; kk < s.K; ++kk) all_done = all_done && done[kk];
    if (all_done) break;
    for (int64_t idx = 0; idx < s.L; ++idx) {
      const Side& sd = total[idx % s.K];
      const float d = delta[idx % s.K];
      blo[idx] = sd.below ? sd.g - d : sd.g;
      bhi[idx] = sd.below ? sd.g : sd.g + d;
    }
    std::vector<int64_t> in_bracket(s.K, 0);
    std::mutex merge;
    at::parallel_for(0, s.O, 1, [&](int64_t o0, int64_t o1) {
      std::vector<int32_t> cnt(s.L, 0);
      for (int64_t o = o0; o < o1; ++o) count_in_each_acc(pw + o * s.L, s.L, blo.data(), bhi.data(), cnt.data());
      std::lock_guard<std::mutex> lock(merge);
      for (int64_t idx = 0; idx < s.L; ++idx) in_bracket[idx % s.K] += cnt[idx];
    });
    for (int64_t kk = 0; kk < s.K; ++kk) {
      if (done[kk]) continue;
      Side& sd = total[kk];
      const float b_lo = sd.below ? sd.g - delta[kk] : sd.g;
      const float b_hi = sd.below ? sd.g : sd.g + delta[kk];
      if (in_bracket[kk] >= sd.size) {
        sd.lo = b_lo;
        sd.hi = b_hi;
        pwidth[kk] = delta[kk];
        done[kk] = 1;
      } else if (sd.below ? b_lo <= 0.0f : b_hi > 3.0e38f) {
        done[kk] = 1;  // the bracket covers the whole side: keep the open bounds
      } else {
        delta[kk] *= 4.0f;
      }
    }
  }
  for (int64_t idx = 0; idx < s.L; ++idx) {
    const int64_t kk = idx % s.K;
    const bool skip = !usable(offsets[kk]);
    blo[idx] = skip ? kInf : total[kk].lo;
    bhi[idx] = skip ? -kInf : total[kk].hi;
  }
  const std::vector<float> gk = along_row(g, s.K, s.L);
  std::mutex merge;
  at::parallel_for(0, s.O, 1, [&](int64_t o0, int64_t o1) {
    std::vector<Side> local;
    for (int64_t kk = 0; kk < s.K; ++kk) {
      local.emplace_back(offsets[kk], pg[kk]);
      local[kk].lo = total[kk].lo;
      local[kk].hi = total[kk].hi;
    }
    std::vector<float> min_row(s.L, kInf);
    for (int64_t o = o0; o < o1; ++o) {
      const float* row = pw + o * s.L;
      min_at_or_above_each(row, s.L, gk.data(), min_row.data());
      for (int64_t c0 = 0; c0 < s.L; c0 += kChunk) {
        const int64_t len = std::min(kChunk, s.L - c0);
        if (count_in_each(row + c0, len, blo.data() + c0, bhi.data() + c0) == 0) continue;
        for (int64_t idx = c0; idx < c0 + len; ++idx) {
          const int64_t kk = idx % s.K;
          if (usable(offsets[kk])) local[kk].offer(std::fabs(row[idx]));
        }
      }
    }
    for (int64_t idx = 0; idx < s.L; ++idx) {
      Side& sd = local[idx % s.K];
      sd.min_above = std::min(sd.min_above, min_row[idx]);
    }
    std::lock_guard<std::mutex> lock(merge);
    for (int64_t kk = 0; kk < s.K; ++kk) total[kk].merge(local[kk]);
  });
  for (int64_t kk = 0; kk < s.K; ++kk) {
    if (usable(offsets[kk])) pok[kk] = total[kk].resolve(offsets[kk], plo + kk, phi + kk);
  }
  return {lo, hi, ok, used_width};
}

// Pass 3: mask <- mask * (1 + Q_f + Q_k), with Q = [|w| > a(k)] * sigmoid((|w| - t) / tau), in place.
// t_f, cut_f: [O]; t_k, cut_k: [K] or absent (no kernel query).
void soft_scale_(torch::Tensor w, torch::Tensor mask, torch::Tensor t_f, torch::Tensor cut_f,
                 c10::optional<torch::Tensor> t_k, c10::optional<torch::Tensor> cut_k, double tau) {
  check_float(w, "weight");
  check_float(mask, "mask");
  const Shape s(w);
  TORCH_CHECK(mask.numel() == w.numel(), "mask must have the weight's shape");
  auto tf = t_f.contiguous();
  auto cf = cut_f.contiguous();
  check_float(tf, "t_f");
  check_float(cf, "cut_f");
  TORCH_CHECK(tf.numel() == s.O && cf.numel() == s.O, "one filter threshold per output filter");
  const bool has_k = t_k.has_value() && cut_k.has_value();
  const std::vector<float> tk = has_k ? along_row(*t_k, s.K, s.L) : std::vector<float>();
  const std::vector<float> lk = has_k ? along_row(*cut_k, s.K, s.L) : std::vector<float>();
  const float inv_tau = static_cast<float>(1.0 / tau);
  const float* pw = w.data_ptr<float>();
  float* pm = mask.data_ptr<float>();
  const float* ptf = tf.data_ptr<float>();
  const float* pcf = cf.data_ptr<float>();
  at::parallel_for(0, s.O, 1, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      soft_row(pw + o * s.L, pm + o * s.L, s.L, ptf[o], pcf[o], has_k ? tk.data() : nullptr,
               has_k ? lk.data() : nullptr, inv_tau);
    }
  });
}

// SR-STE decay: grad += lam * w * [mask == 0], in place.
void decay_(torch::Tensor grad, torch::Tensor w, torch::Tensor mask, double lam) {
  check_float(grad, "grad");
  check_float(w, "weight");
  check_float(mask, "mask");
  TORCH_CHECK(grad.numel() == w.numel() && mask.numel() == w.numel(), "grad, weight and mask must match");
  float* pg = grad.data_ptr<float>();
  const float* pw = w.data_ptr<float>();
  const float* pm = mask.data_ptr<float>();
  const float l = static_cast<float>(lam);
  at::parallel_for(0, w.numel(), 1 << 14, [&](int64_t b, int64_t e) { decay_range(pg + b, pw + b, pm + b, e - b, l); });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("nm_pass", &nm_pass, "hard N:M mask, block L1 and counts below the guesses");
  mod.def("kth_select", &kth_select, "exact k-th / (k+1)-th smallest per query set, given a guess");
  mod.def("soft_scale_", &soft_scale_, "mask *= 1 + Q_f + Q_k");
  mod.def("decay_", &decay_, "SR-STE decay on pruned weights");
}
