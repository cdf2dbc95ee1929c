// Fused CPU kernels for the MaxQ mask: B_t * (1 + Q_f + Q_k) of one layer in two passes over its weight, and
// the SR-STE decay. The device-agnostic definition is maxq/core/masks.py; the tests hold both to the full-sort
// reference in maxq/core/reference.py (same surviving weights, same thresholds, values to float rounding).
//
// Layout: a weight is viewed as [O, I, K] (K = kh * kw; 1 for Linear), one row of L = I * K per output filter.
// N:M blocks are m consecutive input channels at fixed (o, k). Filter-axis query sets are the rows o;
// kernel-axis query sets are the columns k (all O * I weights at kernel position k).
//
// mask_(): pass A reads the weight once and gathers what the order statistics need -- per query set, how many
// entries lie below a guessed threshold (last update's), the largest below and the smallest above it, and every
// entry within a small bracket around it -- and, mid-ramp, the block L1 norms. The exact k-th and (k+1)-th
// smallest of each set follow from those (a set the bracket did not cover is solved exactly with nth_element).
// The dense blocks are chosen the same way. Pass B reads the weight again and writes the mask: the N:M rank of
// every entry in its block, the dense blocks, and the soft scale 1 + Q_f + Q_k. Memory traffic: two reads of
// the weight and one write of the mask.
//
// Lean storage (maxq.core.masks): mask_ can also (or only) write the layer's mask *state* -- bit planes (the kept
// entries B; for the soft mask also the filter and kernel query's keep flags) and the thresholds t and cuts a(k) of
// every query set -- and apply_ recomputes the mask, or W * mask, from the weight and that state with exactly the
// float operations of pass B below (the same inline soft_scale), so a mask stored as bits multiplies the weight
// bit for bit like the float mask mask_ writes.
//
// Built with -fno-trapping-math so that the compiler may if-convert and vectorize the branch-free loops below.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
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

// The soft scale 1 + Q_f + Q_k of an entry of magnitude a: the one expression every pass uses (pass B's two loops
// and apply_), so that the compiler forms the same operations (contractions included) everywhere.
inline float soft_scale_fk(float a, float inv_tau, float shift, float cut, float tk, float ck) {
  const float qf = static_cast<float>(a > cut) * sigmoid_approx(a * inv_tau + shift);
  const float qk = static_cast<float>(a > ck) * sigmoid_approx((a - tk) * inv_tau);
  return 1.0f + qf + qk;
}

inline float soft_scale_f(float a, float inv_tau, float shift, float cut) {
  return 1.0f + static_cast<float>(a > cut) * sigmoid_approx(a * inv_tau + shift);
}

void check_float(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous(), what,
              " must be a contiguous float32 CPU tensor");
}

// ---- exact order statistics near a guess ------------------------------------------------------------------

// What one pass over a query set gathers around a guess g: how many entries lie below g, and every entry in the
// bracket [lo, hi) = [g - d, g + d) (the candidates: the largest entries below g and the smallest at or above it).
struct Near {
  float g = 0.0f, lo = kInf, hi = -kInf;  // an empty bracket until a guess is set
  int64_t below = 0;
  std::vector<float> cand;

  void set(float guess, float width) {
    g = guess;
    lo = guess - width;
    hi = guess + width;
  }
  void merge(const Near& other) {
    below += other.below;
    cand.insert(cand.end(), other.cand.begin(), other.cand.end());
  }
  // a(k), a(k+1) (k 1-indexed) if the bracket held them; `used` receives the number of candidates (to size the
  // bracket next time).
  bool resolve(int64_t k, float* a_k, float* a_k1, int64_t* used) {
    const int64_t offset = below - k;  // >= 0: a(k) lies below g
    *used = static_cast<int64_t>(cand.size());
    // In place: the candidates below g first (largest first after nth_element), then those at or above g.
    const auto mid = std::partition(cand.begin(), cand.end(), [this](float v) { return v < g; });
    const int64_t n_lower = mid - cand.begin(), n_upper = cand.end() - mid;
    if (offset >= 0) {  // a(k): the (offset+1)-th largest below g; a(k+1): the offset-th, or the smallest above
      if (n_lower < offset + 1) return false;
      std::nth_element(cand.begin(), cand.begin() + offset, mid, std::greater<float>());
      *a_k = cand[offset];
      if (offset > 0) {
        *a_k1 = *std::min_element(cand.begin(), cand.begin() + offset);
        return true;
      }
      if (n_upper == 0) return false;
      *a_k1 = *std::min_element(mid, cand.end());
      return true;
    }
    const int64_t r = -offset;  // a(k): the r-th smallest at or above g; a(k+1): the (r+1)-th
    if (n_upper < r + 1) return false;
    std::nth_element(mid, mid + r, cand.end());
    *a_k1 = mid[r];
    *a_k = *std::max_element(mid, mid + r);
    return true;
  }
};

// Exact a(k), a(k+1) of `values` (consumed as scratch).
void exact_pair(std::vector<float>& values, int64_t k, float* a_k, float* a_k1) {
  std::nth_element(values.begin(), values.begin() + (k - 1), values.end());
  *a_k = values[k - 1];
  *a_k1 = *std::min_element(values.begin() + k, values.end());
}

// Guess and bracket half-width for the next update, from this one's threshold t: widen the bracket when it
// missed, or when it held so few entries that the next drift would miss; narrow it when it held far more than
// needed (each candidate costs a scalar insert). `needed`: how many ranks the threshold moved, plus one.
void next_guess(float* guess, float* width, float t, float a_k, float a_k1, bool had_guess, bool hit,
                int64_t used, int64_t needed) {
  float w = *width;
  const float floor_w = std::max(std::fabs(t) * 1e-7f, 1e-30f);
  if (!had_guess || !std::isfinite(w)) {
    w = std::max({(a_k1 - a_k) * 16.0f, std::fabs(t) * 1e-2f, floor_w});
  } else if (!hit) {
    w = std::max({w * 4.0f, std::fabs(t - *guess) * 2.0f, floor_w});
  } else if (used < 2 * needed + 16) {
    w = w * 2.0f;
  } else if (used > 8 * needed + 256) {
    w = std::max(w * 0.75f, floor_w);
  }
  *guess = t;
  *width = w;
}

inline bool valid(float guess, float width) { return std::isfinite(guess) && std::isfinite(width) && width > 0; }

// ---- N:M rank within a block -------------------------------------------------------------------------------

// Keep flags (0/1) of one row, block-major: T holds |row| as T[j * Q + q] (j: channel in block, q = b * K + k),
// R receives the flags in the same order; in every block the n largest stay, ties to the lower channel. Two ways,
// both vectorized over all Q blocks of a row: an insertion network for the n-th largest value (large blocks),
// or ranks by m * m compares (small blocks, nm_rank_any below).
// The n largest values of every block, descending, into top[t * Q + q] (t < n): an insertion network of n * m
// min/max passes over all Q blocks of a row at once. `top` has room for (n + 1) * Q floats.
__attribute__((noinline)) void block_top_n(const float* __restrict__ T, int64_t Q, int n, int m,
                                           float* __restrict__ top) {
  float* __restrict__ s = top + n * Q;  // the value being inserted
  for (int j = 0; j < m; ++j) {
    const float* __restrict__ tj = T + j * Q;
    for (int64_t q = 0; q < Q; ++q) s[q] = tj[q];
    const int depth = std::min(j, n);
    for (int t = 0; t < depth; ++t) {
      float* __restrict__ tt = top + t * Q;
      for (int64_t q = 0; q < Q; ++q) {
        const float hi = std::max(tt[q], s[q]), lo = std::min(tt[q], s[q]);
        tt[q] = hi;
        s[q] = lo;
      }
    }
    if (j < n) {
      float* __restrict__ tj_top = top + j * Q;
      for (int64_t q = 0; q < Q; ++q) tj_top[q] = s[q];
    }
  }
}

// Keep flags from the n-th largest value of every block (block_top_n): what is above it stays and, of the
// entries equal to it, the first ones in channel order. `top` as filled by block_top_n, plus Q floats of scratch.
__attribute__((noinline)) void nm_keep_rows(const float* __restrict__ T, float* __restrict__ R, int64_t Q, int n,
                                            int m, float* __restrict__ top) {
  float* __restrict__ aux = top + (n + 1) * Q;  // count above thr, then equal entries still to keep
  const float* __restrict__ thr = top + (n - 1) * Q;
  for (int64_t q = 0; q < Q; ++q) aux[q] = 0.0f;
  for (int j = 0; j < m; ++j) {  // aux = entries strictly above thr
    const float* __restrict__ tj = T + j * Q;
    for (int64_t q = 0; q < Q; ++q) aux[q] += static_cast<float>(tj[q] > thr[q]);
  }
  for (int64_t q = 0; q < Q; ++q) aux[q] = static_cast<float>(n) - aux[q];  // equal entries that still stay
  for (int j = 0; j < m; ++j) {
    const float* __restrict__ tj = T + j * Q;
    float* __restrict__ rj = R + j * Q;
    for (int64_t q = 0; q < Q; ++q) {  // arithmetic, not && / ||: branch-free, so it vectorizes
      const float above = tj[q] > thr[q] ? 1.0f : 0.0f;
      const float take = (tj[q] == thr[q]) & (aux[q] > 0.0f) ? 1.0f : 0.0f;
      aux[q] -= take;
      rj[q] = above + take;
    }
  }
}

// The same flags by rank: entry j of a block is kept if fewer than n entries beat it (larger, or equal with a
// lower channel). m * m compares per block: cheaper than the network above for small blocks (2:4, 1:8, ...).
template <int M>
void nm_rank(const float* __restrict__ T, float* __restrict__ R, int64_t Q, int n) {
  for (int j = 0; j < M; ++j) {
    const float* aj = T + j * Q;
    float* rj = R + j * Q;
    for (int64_t q = 0; q < Q; ++q) {
      int rank = 0;
#pragma GCC unroll 32
      for (int i = 0; i < M; ++i) {
        const float ai = T[i * Q + q];
        rank += static_cast<int>(i < j ? ai >= aj[q] : (i > j && ai > aj[q]));
      }
      rj[q] = static_cast<float>(rank < n);
    }
  }
}

void nm_rank_generic(const float* T, float* R, int64_t Q, int n, int m) {
  for (int j = 0; j < m; ++j) {
    for (int64_t q = 0; q < Q; ++q) {
      int rank = 0;
      for (int i = 0; i < m; ++i) {
        const float ai = T[i * Q + q], aj = T[j * Q + q];
        rank += static_cast<int>(i < j ? ai >= aj : (i > j && ai > aj));
      }
      R[j * Q + q] = static_cast<float>(rank < n);
    }
  }
}

__attribute__((noinline)) void nm_rank_any(const float* T, float* R, int64_t Q, int n, int m) {
  switch (m) {
    case 2: return nm_rank<2>(T, R, Q, n);
    case 4: return nm_rank<4>(T, R, Q, n);
    case 8: return nm_rank<8>(T, R, Q, n);
    case 16: return nm_rank<16>(T, R, Q, n);
    case 32: return nm_rank<32>(T, R, Q, n);
    default: return nm_rank_generic(T, R, Q, n, m);
  }
}

// |row| (L = B * m * K) to block-major T[j * Q + b * K + k], Q = B * K.
__attribute__((noinline)) void to_block_major(const float* __restrict__ row, float* __restrict__ T, int64_t B, int m, int64_t K) {
  const int64_t Q = B * K;
  for (int64_t b = 0; b < B; ++b) {
    for (int j = 0; j < m; ++j) {
      const float* src = row + (b * m + j) * K;
      float* dst = T + j * Q + b * K;
      for (int64_t k = 0; k < K; ++k) dst[k] = std::fabs(src[k]);
    }
  }
}

// ---- pass A: counts, extremes and candidates around the guesses ----------------------------------------------

// ---- branch-free row loops (separate functions with restrict pointers and scalars by value: so they vectorize)

// One pass over a row (or any run of values) for the order statistics: entries below the filter guess g (one
// per row) and below each kernel-position guess gk[idx], and a flag per entry: bit 0 in the filter bracket
// [lo, hi), bit 1 in its kernel bracket [lk[idx], hk[idx]). One long branch-free loop (short ones spend their
// time in the vectorizer's alignment prologue), kept out of line: inlined into the big caller, the compiler
// loses the restrict qualifiers and with them the vectorization.
// Abs: scan |row| (weights) or row as it is (dense-block scores, which may be negative).
template <bool Abs, bool F, bool Kq>
__attribute__((noinline)) int64_t scan(const float* __restrict__ row, int64_t L, float g, float lo, float hi,
                                       const float* __restrict__ gk, const float* __restrict__ lk,
                                       const float* __restrict__ hk, int32_t* __restrict__ below_k,
                                       uint8_t* __restrict__ in) {
  int32_t cnt = 0;
#pragma omp simd reduction(+ : cnt)
  for (int64_t idx = 0; idx < L; ++idx) {
    const float a = Abs ? std::fabs(row[idx]) : row[idx];
    uint8_t flag = 0;
    if (F) {
      cnt += static_cast<int32_t>(a < g);
      flag = static_cast<uint8_t>((a >= lo) & (a < hi));
    }
    if (Kq) {
      below_k[idx] += static_cast<int32_t>(a < gk[idx]);
      flag = static_cast<uint8_t>(flag | (static_cast<uint8_t>((a >= lk[idx]) & (a < hk[idx])) << 1));
    }
    in[idx] = flag;
  }
  return cnt;
}

// Calls fn(idx) for every idx < L with in[idx] set, reading the flags eight at a time (most words are zero).
template <typename Fn>
void for_flagged(const uint8_t* in, int64_t L, Fn fn) {
  int64_t idx = 0;
  for (; idx + 8 <= L; idx += 8) {
    uint64_t word;
    std::memcpy(&word, in + idx, 8);
    if (word == 0) continue;
    for (int64_t j = idx; j < idx + 8; ++j) {
      if (in[j]) fn(j);
    }
  }
  for (; idx < L; ++idx) {
    if (in[idx]) fn(idx);
  }
}

// Block L1 of one row from its block-major copy T (summed in channel order).
__attribute__((noinline)) void block_l1_row(const float* __restrict__ T, float* __restrict__ out, int64_t Q, int m) {
  for (int64_t q = 0; q < Q; ++q) out[q] = T[q];
  for (int j = 1; j < m; ++j) {
    const float* tj = T + j * Q;
    for (int64_t q = 0; q < Q; ++q) out[q] += tj[q];
  }
}

// Keep flags from block-major R back to the row's order; whole blocks where dense[q].
__attribute__((noinline)) void keep_to_row(const float* __restrict__ R, const uint8_t* __restrict__ dense, float* __restrict__ mrow,
                 int64_t B, int m, int64_t K) {
  const int64_t Q = B * K;
  for (int64_t b = 0; b < B; ++b) {
    for (int j = 0; j < m; ++j) {
      const float* src = R + j * Q + b * K;
      float* dst = mrow + (b * m + j) * K;
      if (dense != nullptr) {
        const uint8_t* d = dense + b * K;
        for (int64_t k = 0; k < K; ++k) dst[k] = d[k] ? 1.0f : src[k];
      } else {
        for (int64_t k = 0; k < K; ++k) dst[k] = src[k];
      }
    }
  }
}

// The mask of a row without dense blocks, block-major: M[j * Q + q] = R[j * Q + q] * (1 + Q_f + Q_k)(T[j * Q + q]).
// The soft scale depends only on the value (and the kernel position k = q % K), and the kept entries of a block
// are its n largest values (top[t * Q + q], t < n), so the sigmoids are computed n times per block, not m: half
// the work at 2:4, a sixteenth at 1:16. tk / ck: the kernel sets' thresholds per block position q (or null).
__attribute__((noinline)) void soft_kept(const float* __restrict__ T, const float* __restrict__ R,
                                         const float* __restrict__ top, float* __restrict__ S,
                                         float* __restrict__ M, int64_t Q, int n, int m, float t, float cut,
                                         const float* __restrict__ tk, const float* __restrict__ ck, float inv_tau) {
  const float shift = -t * inv_tau;
  for (int v = 0; v < n; ++v) {
    const float* __restrict__ tv = top + v * Q;
    float* __restrict__ sv = S + v * Q;
    if (tk != nullptr) {
      for (int64_t q = 0; q < Q; ++q) sv[q] = soft_scale_fk(tv[q], inv_tau, shift, cut, tk[q], ck[q]);
    } else {
      for (int64_t q = 0; q < Q; ++q) sv[q] = soft_scale_f(tv[q], inv_tau, shift, cut);
    }
  }
  // A kept entry equals one of its block's n largest values (equal values, equal scale): pick that one's scale.
  // One simple loop over q per step, so that each vectorizes.
  for (int j = 0; j < m; ++j) {
    const float* __restrict__ tj = T + j * Q;
    const float* __restrict__ rj = R + j * Q;
    float* __restrict__ mj = M + j * Q;
    const float* __restrict__ last = S + (n - 1) * Q;
    for (int64_t q = 0; q < Q; ++q) mj[q] = last[q];
    for (int v = n - 2; v >= 0; --v) {
      const float* __restrict__ tv = top + v * Q;
      const float* __restrict__ sv = S + v * Q;
      for (int64_t q = 0; q < Q; ++q) mj[q] = tj[q] == tv[q] ? sv[q] : mj[q];
    }
    for (int64_t q = 0; q < Q; ++q) mj[q] *= rj[q];
  }
}

// mrow *= 1 + Q_f + Q_k, Q = [|w| > cut] * sigmoid((|w| - t) / tau); tk / ck hold the kernel sets' thresholds
// along the row (or are null: no kernel query). Branch-free (the sigmoid is computed everywhere, then gated), so
// it vectorizes. (Sharing one division between the two queries measured slower.)
__attribute__((noinline)) void soft_row(const float* __restrict__ row, float* __restrict__ mrow, int64_t L, float t,
                                        float cut, const float* __restrict__ tk, const float* __restrict__ ck,
                                        float inv_tau) {
  const float shift = -t * inv_tau;
  if (tk != nullptr) {
    for (int64_t idx = 0; idx < L; ++idx) {
      mrow[idx] = mrow[idx] * soft_scale_fk(std::fabs(row[idx]), inv_tau, shift, cut, tk[idx], ck[idx]);
    }
  } else {
    for (int64_t idx = 0; idx < L; ++idx) {
      mrow[idx] = mrow[idx] * soft_scale_f(std::fabs(row[idx]), inv_tau, shift, cut);
    }
  }
}

// ---- bit planes: bit j of a row is byte j / 8, bit j % 8 (lowest first); rows are padded to whole bytes ----------

inline void set_bit(uint8_t* row, int64_t j) { row[j >> 3] = static_cast<uint8_t>(row[j >> 3] | (1u << (j & 7))); }

inline bool get_bit(const uint8_t* row, int64_t j) { return (row[j >> 3] >> (j & 7)) & 1u; }

// Eight 0/1 bytes (lowest first) into one byte of bits (lowest first): the multiply gathers bit 0 of every byte
// into the top byte.
inline uint8_t pack8(const uint8_t* flags) {
  uint64_t x;
  std::memcpy(&x, flags, 8);
  return static_cast<uint8_t>((x * 0x0102040810204080ULL) >> 56);
}

// 0/1 bytes f[j], j < L, into `out` (ceil(L / 8) bytes, overwritten; the tail byte's spare bits 0).
inline void pack_bytes(const uint8_t* f, uint8_t* out, int64_t L) {
  int64_t j = 0;
  for (; j + 8 <= L; j += 8) out[j >> 3] = pack8(f + j);
  if (j < L) {
    uint32_t bits = 0;
    for (int b = 0; j + b < L; ++b) bits |= static_cast<uint32_t>(f[j + b]) << b;
    out[j >> 3] = static_cast<uint8_t>(bits);
  }
}

// Row flags as bytes first (branch-free loops that vectorize), then packed.
void pack_nonzero(const float* __restrict__ vals, uint8_t* out, int64_t L, uint8_t* __restrict__ f) {
  for (int64_t j = 0; j < L; ++j) f[j] = static_cast<uint8_t>(vals[j] != 0.0f);
  pack_bytes(f, out, L);
}

void pack_above(const float* __restrict__ row, float cut, uint8_t* out, int64_t L, uint8_t* __restrict__ f) {
  for (int64_t j = 0; j < L; ++j) f[j] = static_cast<uint8_t>(std::fabs(row[j]) > cut);
  pack_bytes(f, out, L);
}

void pack_above_each(const float* __restrict__ row, const float* __restrict__ cut, uint8_t* out, int64_t L,
                     uint8_t* __restrict__ f) {
  for (int64_t j = 0; j < L; ++j) f[j] = static_cast<uint8_t>(std::fabs(row[j]) > cut[j]);
  pack_bytes(f, out, L);
}

// 0/1 floats of every bit of a packed row (a table of the 256 byte values: one 32-byte copy per byte).
struct BitFloats {
  float table[256][8];
  BitFloats() {
    for (int v = 0; v < 256; ++v) {
      for (int b = 0; b < 8; ++b) table[v][b] = static_cast<float>((v >> b) & 1);
    }
  }
};

inline void unpack_floats(const uint8_t* bits, int64_t L, float* __restrict__ out) {
  static const BitFloats lut;
  int64_t j = 0;
  for (; j + 8 <= L; j += 8) std::memcpy(out + j, lut.table[bits[j >> 3]], 8 * sizeof(float));
  for (; j < L; ++j) out[j] = static_cast<float>((bits[j >> 3] >> (j & 7)) & 1);
}

}  // namespace

// The MaxQ mask of w into `mask` (both [O, I, ...] float32, contiguous), in place, and/or its state.
//   mask: the float mask (optional: without it nothing is multiplied by the soft scale, only the state is written).
//   state: float32 [2*O + 2*K + 2]: per filter set (guess, bracket half-width), per kernel set (guess, width),
//          then the dense-block cut (guess, width); NaN = no guess. Updated for the next call.
//   soft: multiply by 1 + Q_f + Q_k (Q_k only for K > 1); tau: the query temperature.
//   dense_count: how many blocks stay whole (the ramp); order: 0 smallest L1, 1 largest L1, 2 largest priority.
//   planes (optional): uint8 [P, O, ceil(L / 8)], bit j of row o = entry (o, j) of the [O, L] view, lowest bit
//          first: plane 0 the kept entries B (dense blocks whole); with `soft` plane 1 the filter query's keep flags
//          (not among the k smallest of the row, ties to the lower index) and, for K > 1, plane 2 the kernel
//          query's. thr (optional, with planes and soft): float32 [2*O + 2*K]: t_f, a_k of every filter set, then
//          t_k, a_k of every kernel set.
// Returns int64 [3]: query sets solved by the exact fallback (filter, kernel) and whether the dense cut was.
torch::Tensor mask_(torch::Tensor w, c10::optional<torch::Tensor> mask_opt, torch::Tensor state, int64_t n, int64_t m,
                    bool soft, double tau, int64_t dense_count, int64_t order, c10::optional<torch::Tensor> priority,
                    c10::optional<torch::Tensor> planes_opt, c10::optional<torch::Tensor> thr_opt) {
  check_float(w, "weight");
  check_float(state, "state");
  TORCH_CHECK(w.dim() >= 2 && w.numel() > 0, "weight must be [O, I, ...] and not empty");
  const int64_t O = w.size(0), I = w.size(1), K = w.numel() / (O * I), L = I * K;
  TORCH_CHECK(m >= 2 && n >= 1 && n < m && I % m == 0, "bad N:M pattern for this weight");
  const bool has_mask = mask_opt.has_value() && mask_opt->defined();
  const bool has_planes = planes_opt.has_value() && planes_opt->defined();
  TORCH_CHECK(has_mask || has_planes, "mask_ needs a mask or planes to write");
  if (has_mask) {
    check_float(*mask_opt, "mask");
    TORCH_CHECK(mask_opt->numel() == w.numel(), "mask must have the weight's shape");
  }
  TORCH_CHECK(state.numel() == 2 * O + 2 * K + 2, "state must hold 2 * O + 2 * K + 2 floats");
  const int64_t B = I / m, Q = B * K, G = O * Q;
  const bool has_f = soft, has_k = soft && K > 1;
  const int64_t Lb = (L + 7) / 8;
  const int64_t P = soft ? (K > 1 ? 3 : 2) : 1;
  uint8_t* pl = nullptr;
  float* pt = nullptr;
  if (has_planes) {
    const auto& pt_ = *planes_opt;
    TORCH_CHECK(pt_.device().is_cpu() && pt_.scalar_type() == torch::kUInt8 && pt_.is_contiguous() &&
                    pt_.numel() == P * O * Lb,
                "planes must be a contiguous uint8 CPU tensor of [P, O, ceil(L / 8)] bytes");
    pl = pt_.data_ptr<uint8_t>();
    if (soft) {
      TORCH_CHECK(thr_opt.has_value() && thr_opt->defined(), "a soft mask's state needs thr");
      check_float(*thr_opt, "thr");
      TORCH_CHECK(thr_opt->numel() == 2 * O + 2 * K, "thr must hold 2 * O + 2 * K floats");
      pt = thr_opt->data_ptr<float>();
    }
  }
  const bool all_dense = dense_count >= G, use_dense = dense_count > 0 && !all_dense;
  const int64_t k_f = (m - n) * L / m, k_k = (m - n) * O * I / m;  // both >= 1 since L, O * I >= m
  const float* pw = w.data_ptr<float>();
  float* pm = has_mask ? mask_opt->data_ptr<float>() : nullptr;
  float* st = state.data_ptr<float>();
  float* gf = st;            // [O] filter guesses
  float* df = st + O;        // [O] filter widths
  float* gk = st + 2 * O;    // [K] kernel guesses
  float* dk = gk + K;        // [K] kernel widths
  float* gd = dk + K;        // dense cut guess, width: gd[0], gd[1]
  auto fallbacks = torch::zeros({3}, torch::kLong);
  int64_t* fb = fallbacks.data_ptr<int64_t>();

  std::vector<float> t_f(has_f ? O : 0), cut_f(has_f ? O : 0), t_k(has_k ? K : 0), cut_k(has_k ? K : 0);
  std::vector<char> tie_f(has_f ? O : 0, 0), tie_k(has_k ? K : 0, 0);
  std::vector<float> l1(use_dense ? G : 0);

  // ---- pass A ----
  bool k_guess = has_k;
  for (int64_t kk = 0; kk < K && k_guess; ++kk) k_guess = valid(gk[kk], dk[kk]);
  std::vector<Near> near_k(has_k ? K : 0);
  std::vector<float> lk(has_k && k_guess ? L : 0), hk(has_k && k_guess ? L : 0), gk_row(has_k && k_guess ? L : 0);
  if (has_k && k_guess) {
    for (int64_t kk = 0; kk < K; ++kk) near_k[kk].set(gk[kk], dk[kk]);
    for (int64_t idx = 0; idx < L; ++idx) {
      gk_row[idx] = gk[idx % K];
      lk[idx] = near_k[idx % K].lo;
      hk[idx] = near_k[idx % K].hi;
    }
  }
  std::atomic<int64_t> fb_f{0};
  if (has_f || use_dense || (has_k && k_guess)) {
    std::mutex merge;
    at::parallel_for(0, O, 1, [&](int64_t o0, int64_t o1) {
      std::vector<float> T(use_dense ? L : 0), scratch;
      std::vector<int32_t> below_k(k_guess ? L : 0, 0);
      std::vector<std::vector<float>> cand_k(k_guess ? K : 0);
      std::vector<uint8_t> in(L);
      for (int64_t o = o0; o < o1; ++o) {
        const float* row = pw + o * L;
        if (use_dense) {  // block L1, summed in channel order (as maxq.core.masks.block_l1)
          to_block_major(row, T.data(), B, static_cast<int>(m), K);
          block_l1_row(T.data(), l1.data() + o * Q, Q, static_cast<int>(m));
        }
        Near nf;
        const bool f_guess = has_f && valid(gf[o], df[o]);
        if (f_guess) nf.set(gf[o], df[o]);
        if (f_guess || k_guess) {
          int64_t below;
          if (f_guess && k_guess) {
            below = scan<true, true, true>(row, L, nf.g, nf.lo, nf.hi, gk_row.data(), lk.data(), hk.data(),
                                           below_k.data(), in.data());
          } else if (f_guess) {
            below = scan<true, true, false>(row, L, nf.g, nf.lo, nf.hi, nullptr, nullptr, nullptr, nullptr,
                                            in.data());
          } else {
            below = scan<true, false, true>(row, L, 0.0f, 0.0f, 0.0f, gk_row.data(), lk.data(), hk.data(),
                                            below_k.data(), in.data());
          }
          nf.below = below;
          for_flagged(in.data(), L, [&](int64_t idx) {
            const float a = std::fabs(row[idx]);
            if (in[idx] & 1) nf.cand.push_back(a);
            if (in[idx] & 2) cand_k[idx % K].push_back(a);
          });
        }
        if (has_f) {  // the filter set is this row: solve it now, while the row is in cache
          float a_k, a_k1;
          int64_t used = 0;
          const bool hit = f_guess && nf.resolve(k_f, &a_k, &a_k1, &used);
          if (!hit) {
            scratch.resize(L);
            for (int64_t idx = 0; idx < L; ++idx) scratch[idx] = std::fabs(row[idx]);
            exact_pair(scratch, k_f, &a_k, &a_k1);
            if (f_guess) fb_f.fetch_add(1, std::memory_order_relaxed);
          }
          t_f[o] = (a_k + a_k1) / 2;
          cut_f[o] = a_k;
          tie_f[o] = a_k == a_k1;
          next_guess(gf + o, df + o, t_f[o], a_k, a_k1, f_guess, hit, used, std::llabs(nf.below - k_f) + 1);
        }
      }
      if (k_guess) {
        std::vector<Near> local(K);
        for (int64_t idx = 0; idx < L; ++idx) local[idx % K].below += below_k[idx];
        std::lock_guard<std::mutex> lock(merge);
        for (int64_t kk = 0; kk < K; ++kk) {
          local[kk].cand = std::move(cand_k[kk]);
          near_k[kk].merge(local[kk]);
        }
      }
    });
  }
  fb[0] = fb_f.load();

  // ---- kernel sets ----
  if (has_k) {
    std::vector<char> solved(K, 0);
    for (int64_t kk = 0; kk < K; ++kk) {
      float a_k, a_k1;
      int64_t used = 0;
      const bool hit = k_guess && near_k[kk].resolve(k_k, &a_k, &a_k1, &used);
      if (hit) {
        t_k[kk] = (a_k + a_k1) / 2;
        cut_k[kk] = a_k;
        tie_k[kk] = a_k == a_k1;
        next_guess(gk + kk, dk + kk, t_k[kk], a_k, a_k1, true, true, used,
                   std::llabs(near_k[kk].below - k_k) + 1);
        solved[kk] = 1;
      }
    }
    // Exact fallback: one column at a time (O * I strided entries).
    at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
      std::vector<float> col;
      for (int64_t kk = k0; kk < k1; ++kk) {
        if (solved[kk]) continue;
        col.resize(O * I);
        for (int64_t r = 0; r < O * I; ++r) col[r] = std::fabs(pw[r * K + kk]);
        float a_k, a_k1;
        exact_pair(col, k_k, &a_k, &a_k1);
        t_k[kk] = (a_k + a_k1) / 2;
        cut_k[kk] = a_k;
        tie_k[kk] = a_k == a_k1;
        next_guess(gk + kk, dk + kk, t_k[kk], a_k, a_k1, k_guess, false, 0, 1);
      }
    });
    for (int64_t kk = 0; kk < K; ++kk) fb[1] += k_guess && !solved[kk];
  }

  // ---- dense blocks (ramp): the dense_count smallest scores, ties to the lower block index ----
  std::vector<uint8_t> dense(use_dense ? G : 0, 0);
  if (use_dense) {
    std::vector<float> score(G);
    const float* pp = nullptr;
    if (order == 2) {
      TORCH_CHECK(priority.has_value() && priority->numel() == G, "order 2 (random) needs one priority per block");
      check_float(*priority, "priority");
      pp = priority->data_ptr<float>();
    }
    // Scores to select the `dense_count` smallest of: L1 (smallest), -L1 (largest), -priority (random).
    at::parallel_for(0, G, 1 << 14, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) score[g] = order == 0 ? l1[g] : (order == 1 ? -l1[g] : -pp[g]);
    });
    Near nd;
    const bool d_guess = valid(gd[0], gd[1]);
    if (d_guess) {
      nd.set(gd[0], gd[1]);
      std::mutex merge;
      at::parallel_for(0, G, 1 << 14, [&](int64_t g0, int64_t g1) {
        Near part;
        part.set(nd.g, gd[1]);
        std::vector<uint8_t> in(g1 - g0);
        part.below = scan<false, true, false>(score.data() + g0, g1 - g0, part.g, part.lo, part.hi, nullptr,
                                              nullptr, nullptr, nullptr, in.data());
        for_flagged(in.data(), g1 - g0, [&](int64_t j) { part.cand.push_back(score[g0 + j]); });
        std::lock_guard<std::mutex> lock(merge);
        nd.merge(part);
      });
    }
    float a_k, a_k1;
    int64_t used = 0;
    const bool hit = d_guess && nd.resolve(dense_count, &a_k, &a_k1, &used);
    if (!hit) {
      std::vector<float> copy(score);
      exact_pair(copy, dense_count, &a_k, &a_k1);
      fb[2] = d_guess;
    }
    next_guess(gd, gd + 1, (a_k + a_k1) / 2, a_k, a_k1, d_guess, hit, used, std::llabs(nd.below - dense_count) + 1);
    if (a_k < a_k1) {  // exactly dense_count scores are <= a(count)
      at::parallel_for(0, G, 1 << 14, [&](int64_t g0, int64_t g1) {
        for (int64_t g = g0; g < g1; ++g) dense[g] = score[g] <= a_k;
      });
    } else {  // a tie at the cut: every score below it, then equal ones by block index
      int64_t need = dense_count;
      for (int64_t g = 0; g < G; ++g) need -= score[g] < a_k;
      for (int64_t g = 0; g < G; ++g) {
        const bool eq = score[g] == a_k && need > 0;
        need -= eq;
        dense[g] = score[g] < a_k || eq;
      }
    }
  }

  // ---- pass B: N:M rank, dense blocks, soft scale (with a mask), bit planes (with planes) ----
  const float inv_tau = static_cast<float>(1.0 / tau);
  std::vector<float> tk_row(has_k && (use_dense || all_dense || has_planes) ? L : 0), ck_row(tk_row.size());
  for (int64_t idx = 0; idx < static_cast<int64_t>(tk_row.size()); ++idx) {
    tk_row[idx] = t_k[idx % K];
    ck_row[idx] = cut_k[idx % K];
  }
  // Without dense blocks the soft scale is computed per kept value in block-major order (soft_kept), else per
  // entry in row order (soft_row). Kernel thresholds per block position q = b * K + k:
  const bool kept_only = has_mask && has_f && !use_dense && !all_dense;
  std::vector<float> tk_q(kept_only && has_k ? Q : 0), ck_q(kept_only && has_k ? Q : 0);
  for (int64_t q = 0; q < static_cast<int64_t>(tk_q.size()); ++q) {
    tk_q[q] = t_k[q % K];
    ck_q[q] = cut_k[q % K];
  }
  at::parallel_for(0, O, 1, [&](int64_t o0, int64_t o1) {
    std::vector<float> T(L), R(L), M(kept_only ? L : 0), top((n + 2) * Q), S(kept_only ? n * Q : 0);
    std::vector<float> own(has_mask ? 0 : L);  // the row's keep flags when no mask is written
    std::vector<uint8_t> flags(has_planes ? L + 8 : 0);
    for (int64_t o = o0; o < o1; ++o) {
      const float* row = pw + o * L;
      float* mrow = has_mask ? pm + o * L : own.data();
      if (all_dense) {
        std::fill(mrow, mrow + L, 1.0f);
      } else {
        to_block_major(row, T.data(), B, static_cast<int>(m), K);
        const bool network = m > 2 * (n + 3);  // whichever costs fewer passes (about (n + 3) * m vs m * m)
        if (network || kept_only) block_top_n(T.data(), Q, static_cast<int>(n), static_cast<int>(m), top.data());
        if (network) {
          nm_keep_rows(T.data(), R.data(), Q, static_cast<int>(n), static_cast<int>(m), top.data());
        } else {
          nm_rank_any(T.data(), R.data(), Q, static_cast<int>(n), static_cast<int>(m));
        }
        if (kept_only) {
          soft_kept(T.data(), R.data(), top.data(), S.data(), M.data(), Q, static_cast<int>(n),
                    static_cast<int>(m), t_f[o], cut_f[o], has_k ? tk_q.data() : nullptr,
                    has_k ? ck_q.data() : nullptr, inv_tau);
          keep_to_row(M.data(), nullptr, mrow, B, static_cast<int>(m), K);
        } else {
          keep_to_row(R.data(), use_dense ? dense.data() + o * Q : nullptr, mrow, B, static_cast<int>(m), K);
        }
      }
      if (has_planes) {  // B is where the row is nonzero: the keep flags, or the mask (values >= 1 where kept)
        pack_nonzero(mrow, pl + o * Lb, L, flags.data());
        if (has_f) {
          pack_above(row, cut_f[o], pl + (O + o) * Lb, L, flags.data());
          if (has_k) pack_above_each(row, ck_row.data(), pl + (2 * O + o) * Lb, L, flags.data());
        }
      }
      if (has_mask && has_f && !kept_only) {
        soft_row(row, mrow, L, t_f[o], cut_f[o], has_k ? tk_row.data() : nullptr, has_k ? ck_row.data() : nullptr,
                 inv_tau);
      }
    }
  });
  if (pt != nullptr) {
    for (int64_t o = 0; o < O; ++o) {
      pt[o] = t_f[o];
      pt[O + o] = cut_f[o];
    }
    for (int64_t kk = 0; kk < (has_k ? K : 0); ++kk) {
      pt[2 * O + kk] = t_k[kk];
      pt[2 * O + K + kk] = cut_k[kk];
    }
  }

  // ---- ties at a query cut (a(k) == a(k+1)): pass B gated with |w| > a(k), dropping every tied entry; by the
  // index rule the lowest-index ones among them stay, each with Q = sigmoid(0) = 0.5 (where B keeps them) ----
  auto fix = [&](auto at, int64_t length, int64_t k, float v, int64_t plane) {
    int64_t below = 0, equal = 0;
    for (int64_t r = 0; r < length; ++r) {
      const float a = std::fabs(pw[at(r)]);
      below += a < v;
      equal += a == v;
    }
    int64_t stay = equal - (k - below);
    for (int64_t r = 0; r < length && stay > 0; ++r) {
      const int64_t e = at(r);
      if (std::fabs(pw[e]) == v) {
        if (pm != nullptr) pm[e] += pm[e] != 0.0f ? 0.5f : 0.0f;
        if (pl != nullptr) set_bit(pl + (plane * O + e / L) * Lb, e % L);
        --stay;
      }
    }
  };
  for (int64_t o = 0; has_f && o < O; ++o) {
    if (tie_f[o]) fix([&](int64_t r) { return o * L + r; }, L, k_f, cut_f[o], 1);
  }
  for (int64_t kk = 0; has_k && kk < K; ++kk) {
    if (tie_k[kk]) fix([&](int64_t r) { return r * K + kk; }, O * I, k_k, cut_k[kk], 2);
  }
  return fallbacks;
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
  at::parallel_for(0, w.numel(), 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) pg[i] += static_cast<float>(pm[i] == 0.0f) * (l * pw[i]);
  });
}

namespace {

// The [O, I, K] view of a weight-shaped tensor in any memory layout (contiguous, channels_last, transposed): how to
// find entry j = i * K + k of row o. Rows of a contiguous view are read in place; others go through a row buffer.
struct RowView {
  int64_t O, I, K, L;
  int64_t s0, s1, sk;  // strides of o, i, k
  bool contiguous;

  RowView(const torch::Tensor& t, int64_t O_, int64_t I_, int64_t K_) : O(O_), I(I_), K(K_), L(I_ * K_) {
    s0 = t.stride(0);
    s1 = t.stride(1);
    sk = 1;
    if (t.dim() == 4 && K > 1) {  // kh * kw must be one strided dimension (contiguous or channels_last kernels)
      TORCH_CHECK(t.size(3) == 1 || t.size(2) == 1 || t.stride(2) == t.stride(3) * t.size(3),
                  "the kernel dimensions of a weight must be mergeable (contiguous or channels_last)");
      sk = t.size(3) == 1 ? t.stride(2) : t.stride(3);
    }
    contiguous = t.is_contiguous();
  }

  template <typename Fn>
  void each(int64_t o, const Fn& fn) const {  // fn(storage offset, j)
    const int64_t base = o * s0;
    for (int64_t i = 0; i < I; ++i) {
      for (int64_t k = 0; k < K; ++k) fn(base + i * s1 + k * sk, i * K + k);
    }
  }
  void gather(const float* src, int64_t o, float* row) const {
    each(o, [&](int64_t e, int64_t j) { row[j] = src[e]; });
  }
  void scatter(const float* row, int64_t o, float* dst) const {
    each(o, [&](int64_t e, int64_t j) { dst[e] = row[j]; });
  }
};

bool same_walk(const torch::Tensor& t, const torch::Tensor& w) {
  if (t.sizes() != w.sizes()) return false;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) != 1 && t.stride(d) != w.stride(d)) return false;
  }
  return true;
}

void check_view(const torch::Tensor& t, const torch::Tensor& w, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && same_walk(t, w), what,
              " must be a float32 CPU tensor with the weight's shape and strides");
}

void check_planes(const torch::Tensor& planes, int64_t count) {
  TORCH_CHECK(planes.device().is_cpu() && planes.scalar_type() == torch::kUInt8 && planes.is_contiguous() &&
                  planes.numel() >= count,
              "planes must be a contiguous uint8 CPU tensor of [P, O, ceil(L / 8)] bytes");
}

// A row's mask M after its soft scale: + 0.5 on the entries kept at a tied query cut (F, Kf: the planes as 0/1
// floats, null where no set of the row has a tie; adding 0.0 elsewhere changes nothing), then W * M if weighted.
__attribute__((noinline)) void finish_row(const float* __restrict__ row, const float* __restrict__ F,
                                          const float* __restrict__ Kf, float* __restrict__ out, int64_t L, float cut,
                                          const float* __restrict__ ck, bool weighted) {
  if (F != nullptr) {
    for (int64_t j = 0; j < L; ++j) {
      const float a = std::fabs(row[j]);
      out[j] = out[j] + static_cast<float>((F[j] != 0.0f) & !(a > cut) & (out[j] != 0.0f)) * 0.5f;
    }
  }
  if (Kf != nullptr) {
    for (int64_t j = 0; j < L; ++j) {
      const float a = std::fabs(row[j]);
      out[j] = out[j] + static_cast<float>((Kf[j] != 0.0f) & !(a > ck[j]) & (out[j] != 0.0f)) * 0.5f;
    }
  }
  if (weighted) {
    for (int64_t j = 0; j < L; ++j) out[j] = row[j] * out[j];
  }
}

// The soft mask of one row (all entries): M = B * (1 + Q_f + Q_k), + 0.5 where kept at a tied cut; then W * M if
// weighted. B, F, Kf: the row's planes as 0/1 floats; tk, ck: the kernel sets' thresholds along the row (or null).
// One simple loop per step, so that each vectorizes (the first is soft_row's).
__attribute__((noinline)) void soft_mask_row(const float* __restrict__ row, const float* __restrict__ B,
                                             const float* __restrict__ F, const float* __restrict__ Kf,
                                             float* __restrict__ out, int64_t L, float t, float cut,
                                             const float* __restrict__ tk, const float* __restrict__ ck,
                                             float inv_tau, bool weighted) {
  const float shift = -t * inv_tau;
  if (weighted && F == nullptr && Kf == nullptr) {  // no tie in the row: W * M in the same pass
    if (tk != nullptr) {
      for (int64_t j = 0; j < L; ++j) {
        out[j] = row[j] * (B[j] * soft_scale_fk(std::fabs(row[j]), inv_tau, shift, cut, tk[j], ck[j]));
      }
    } else {
      for (int64_t j = 0; j < L; ++j) out[j] = row[j] * (B[j] * soft_scale_f(std::fabs(row[j]), inv_tau, shift, cut));
    }
    return;
  }
  if (tk != nullptr) {
    for (int64_t j = 0; j < L; ++j) out[j] = B[j] * soft_scale_fk(std::fabs(row[j]), inv_tau, shift, cut, tk[j], ck[j]);
  } else {
    for (int64_t j = 0; j < L; ++j) out[j] = B[j] * soft_scale_f(std::fabs(row[j]), inv_tau, shift, cut);
  }
  finish_row(row, F, Kf, out, L, cut, ck, weighted);
}

// Rows per parallel task: about ATen's grain (32768 entries), so that small layers run on the calling thread
// (waking a pool for a few microseconds of work costs more than the work, the more so on a busy machine).
inline int64_t row_grain(int64_t L) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(L, 1)); }

inline int64_t popcount_row(const uint8_t* bits, int64_t Lb) {
  int64_t count = 0;
  for (int64_t b = 0; b < Lb; ++b) count += __builtin_popcount(bits[b]);
  return count;
}

}  // namespace

// Recompute the mask (weighted = 0) or W * mask (weighted = 1) of w from its state (planes, thr: see mask_) into
// out, with exactly pass B's float operations: B * (1 + Q_f + Q_k) (soft) or B (hard), +0.5 for the entries kept
// at a tied query cut. w and out: float32 [O, I(, kh, kw)] views with the same strides (any layout); planes are
// in the [O, L] order of the logical view. A row whose blocks all keep exactly n (no dense blocks) computes the
// soft scale of its kept entries only.
void apply_(torch::Tensor w, torch::Tensor planes, c10::optional<torch::Tensor> thr_opt, bool soft, double tau,
            int64_t weighted_, torch::Tensor out, int64_t n, int64_t m) {
  TORCH_CHECK(w.dim() == 2 || w.dim() == 4, "weight must be [O, I] or [O, I, kh, kw]");
  check_view(w, w, "weight");
  check_view(out, w, "out");
  const int64_t O = w.size(0), I = w.size(1), K = w.numel() / (O * I), L = I * K, Lb = (L + 7) / 8;
  const bool has_k = soft && K > 1;
  check_planes(planes, (soft ? (K > 1 ? 3 : 2) : 1) * O * Lb);
  const float* thr = nullptr;
  if (soft) {
    TORCH_CHECK(thr_opt.has_value() && thr_opt->defined(), "a soft mask needs its thresholds");
    check_float(*thr_opt, "thr");
    TORCH_CHECK(thr_opt->numel() == 2 * O + 2 * K, "thr must hold 2 * O + 2 * K floats");
    thr = thr_opt->data_ptr<float>();
  }
  const bool weighted = weighted_ == 1;
  const float inv_tau = static_cast<float>(1.0 / tau);
  const RowView view(w, O, I, K);
  // Rows without dense blocks can take pass B's block-wise path (the sigmoids of each block's n largest only);
  // it pays for its reordering passes only with a kernel query and at most a quarter kept (measured: a 3x3 conv
  // at 1:4 and sparser; a Linear, or 2:4, runs faster through the vectorized full row).
  const bool blockwise = has_k && 2 * n < m;
  const float* pw = w.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const uint8_t* pb = planes.data_ptr<uint8_t>();
  std::vector<float> tk_row(has_k ? L : 0), ck_row(has_k ? L : 0);
  for (int64_t j = 0; j < static_cast<int64_t>(tk_row.size()); ++j) {
    tk_row[j] = thr[2 * O + j % K];
    ck_row[j] = thr[2 * O + K + j % K];
  }
  // A set can hold entries kept at a tied cut only if a(k) == a(k + 1), i.e. t == a(k) (t may also round onto
  // a(k) without a tie: then the tie pass just changes nothing). Rows and layers without one skip that pass.
  bool k_tie = false;
  for (int64_t kk = 0; has_k && kk < K; ++kk) k_tie = k_tie || thr[2 * O + kk] == thr[2 * O + K + kk];
  TORCH_CHECK(!soft || (m >= 2 && n >= 1 && n < m && I % m == 0), "bad N:M pattern for this weight");
  const int64_t Bk = soft ? I / m : 0, Q = Bk * K;  // blocks per kernel position, blocks per row
  std::vector<float> tk_q(has_k ? Q : 0), ck_q(has_k ? Q : 0);
  for (int64_t q = 0; q < static_cast<int64_t>(tk_q.size()); ++q) {
    tk_q[q] = thr[2 * O + q % K];
    ck_q[q] = thr[2 * O + K + q % K];
  }
  at::parallel_for(0, O, row_grain(L), [&](int64_t o0, int64_t o1) {
    std::vector<float> wbuf(view.contiguous ? 0 : L), obuf(view.contiguous ? 0 : L), B(L);
    std::vector<float> F(soft ? L : 0), Kf(has_k ? L : 0);
    std::vector<float> T(soft ? L : 0), R(soft ? L : 0), M(soft ? L : 0), top(soft ? (n + 2) * Q : 0);
    std::vector<float> S(soft ? n * Q : 0);
    for (int64_t o = o0; o < o1; ++o) {
      const float* row = view.contiguous ? pw + o * L : wbuf.data();
      if (!view.contiguous) view.gather(pw, o, wbuf.data());
      float* orow = view.contiguous ? po + o * L : obuf.data();
      const uint8_t* brow = pb + o * Lb;
      unpack_floats(brow, L, B.data());
      if (!soft) {
        for (int64_t j = 0; j < L; ++j) orow[j] = weighted ? row[j] * B[j] : B[j];
      } else {
        const float t = thr[o], cut = thr[O + o];
        const bool f_tie = t == cut;
        const uint8_t* frow = pb + (O + o) * Lb;
        const uint8_t* krow = has_k ? pb + (2 * O + o) * Lb : nullptr;
        const int64_t kept = popcount_row(brow, Lb);
        if (blockwise && kept * m == static_cast<int64_t>(n) * L) {
          // No dense block in the row: every block keeps exactly its n largest. Pass B's own no-dense-block path
          // (soft_kept): the soft scale of each block's n largest values only, spread back to the kept entries;
          // then the ties and W * M in row order.
          to_block_major(row, T.data(), Bk, static_cast<int>(m), K);
          to_block_major(B.data(), R.data(), Bk, static_cast<int>(m), K);  // 0/1 flags: fabs changes nothing
          block_top_n(T.data(), Q, static_cast<int>(n), static_cast<int>(m), top.data());
          soft_kept(T.data(), R.data(), top.data(), S.data(), M.data(), Q, static_cast<int>(n), static_cast<int>(m),
                    t, cut, has_k ? tk_q.data() : nullptr, has_k ? ck_q.data() : nullptr, inv_tau);
          keep_to_row(M.data(), nullptr, orow, Bk, static_cast<int>(m), K);
          if (f_tie) unpack_floats(frow, L, F.data());
          if (has_k && k_tie) unpack_floats(krow, L, Kf.data());
          finish_row(row, f_tie ? F.data() : nullptr, has_k && k_tie ? Kf.data() : nullptr, orow, L, cut,
                     has_k ? ck_row.data() : nullptr, weighted);
        } else {
          if (f_tie) unpack_floats(frow, L, F.data());
          if (has_k && k_tie) unpack_floats(krow, L, Kf.data());
          soft_mask_row(row, B.data(), f_tie ? F.data() : nullptr, has_k && k_tie ? Kf.data() : nullptr, orow, L,
                        t, cut, has_k ? tk_row.data() : nullptr, has_k ? ck_row.data() : nullptr, inv_tau,
                        weighted);
        }
      }
      if (!view.contiguous) view.scatter(orow, o, po);
    }
  });
}

// SR-STE decay from the kept bits: grad += lam * w * [not kept], in place (grad: a view with the weight's strides).
void decay_bits_(torch::Tensor grad, torch::Tensor w, torch::Tensor planes, double lam) {
  TORCH_CHECK(w.dim() == 2 || w.dim() == 4, "weight must be [O, I] or [O, I, kh, kw]");
  check_view(w, w, "weight");
  check_view(grad, w, "grad");
  const int64_t O = w.size(0), I = w.size(1), K = w.numel() / (O * I), L = I * K, Lb = (L + 7) / 8;
  check_planes(planes, O * Lb);
  const RowView view(w, O, I, K);
  const float* pw = w.data_ptr<float>();
  float* pg = grad.data_ptr<float>();
  const uint8_t* pb = planes.data_ptr<uint8_t>();
  const float l = static_cast<float>(lam);
  at::parallel_for(0, O, row_grain(L), [&](int64_t o0, int64_t o1) {
    std::vector<float> wbuf(view.contiguous ? 0 : L), gbuf(view.contiguous ? 0 : L), B(L);
    for (int64_t o = o0; o < o1; ++o) {
      const float* row = view.contiguous ? pw + o * L : wbuf.data();
      float* grow = view.contiguous ? pg + o * L : gbuf.data();
      if (!view.contiguous) {
        view.gather(pw, o, wbuf.data());
        view.gather(pg, o, gbuf.data());
      }
      unpack_floats(pb + o * Lb, L, B.data());
      for (int64_t j = 0; j < L; ++j) grow[j] += static_cast<float>(B[j] == 0.0f) * (l * row[j]);
      if (!view.contiguous) view.scatter(grow, o, pg);
    }
  });
}

// grad *= kept bits, in place (the one-shot gradient: pruned weights get none).
void mask_grad_(torch::Tensor grad, torch::Tensor planes) {
  TORCH_CHECK(grad.dim() == 2 || grad.dim() == 4, "grad must be [O, I] or [O, I, kh, kw]");
  check_view(grad, grad, "grad");
  const int64_t O = grad.size(0), I = grad.size(1), K = grad.numel() / (O * I), L = I * K, Lb = (L + 7) / 8;
  check_planes(planes, O * Lb);
  const RowView view(grad, O, I, K);
  float* pg = grad.data_ptr<float>();
  const uint8_t* pb = planes.data_ptr<uint8_t>();
  at::parallel_for(0, O, row_grain(L), [&](int64_t o0, int64_t o1) {
    std::vector<float> gbuf(view.contiguous ? 0 : L), B(L);
    for (int64_t o = o0; o < o1; ++o) {
      float* grow = view.contiguous ? pg + o * L : gbuf.data();
      if (!view.contiguous) view.gather(pg, o, gbuf.data());
      unpack_floats(pb + o * Lb, L, B.data());
      for (int64_t j = 0; j < L; ++j) grow[j] = grow[j] * B[j];
      if (!view.contiguous) view.scatter(grow, o, pg);
    }
  });
}

// The pruned weights out of w and back: backward's W * mask without a weight-sized copy. split_ writes row o's
// pruned values, in row order, to stash[o, :count] and then masks the row in place, w = w * kept bits (the very
// product apply_ computes for a hard mask); join_ writes them back. stash: float32 [O, S], S >= every row's pruned
// count (split_ checks it before anything is written). w: a float32 [O, I(, kh, kw)] view in any layout, as apply_'s.
void move_pruned(torch::Tensor w, torch::Tensor planes, torch::Tensor stash, bool split) {
  TORCH_CHECK(w.dim() == 2 || w.dim() == 4, "weight must be [O, I] or [O, I, kh, kw]");
  check_view(w, w, "weight");
  const int64_t O = w.size(0), I = w.size(1), K = w.numel() / (O * I), L = I * K, Lb = (L + 7) / 8;
  check_planes(planes, O * Lb);
  TORCH_CHECK(stash.device().is_cpu() && stash.scalar_type() == torch::kFloat && stash.is_contiguous() &&
                  stash.dim() == 2 && stash.size(0) == O,
              "stash must be a contiguous float32 CPU tensor of [O, S]");
  const int64_t S = stash.size(1);
  const uint8_t* pb = planes.data_ptr<uint8_t>();
  if (split) {
    int64_t most = 0;
    for (int64_t o = 0; o < O; ++o) {
      const uint8_t* bits = pb + o * Lb;
      int64_t kept = popcount_row(bits, L / 8);
      for (int64_t j = L / 8 * 8; j < L; ++j) kept += (bits[j >> 3] >> (j & 7)) & 1;
      most = std::max(most, L - kept);
    }
    TORCH_CHECK(most <= S, "stash has ", S, " slots per row, a row prunes ", most);
  }
  const RowView view(w, O, I, K);
  float* pw = w.data_ptr<float>();
  float* ps = stash.data_ptr<float>();
  at::parallel_for(0, O, row_grain(L), [&](int64_t o0, int64_t o1) {
    std::vector<float> wbuf(view.contiguous ? 0 : L), B(L);
    for (int64_t o = o0; o < o1; ++o) {
      float* row = view.contiguous ? pw + o * L : wbuf.data();
      if (!view.contiguous) view.gather(pw, o, wbuf.data());
      unpack_floats(pb + o * Lb, L, B.data());
      float* srow = ps + o * S;
      int64_t c = 0;
      if (split) {
        for (int64_t j = 0; j < L && c < S; ++j) {
          if (B[j] == 0.0f) srow[c++] = row[j];
        }
        for (int64_t j = 0; j < L; ++j) row[j] = row[j] * B[j];
      } else {
        for (int64_t j = 0; j < L && c < S; ++j) {
          if (B[j] == 0.0f) row[j] = srow[c++];
        }
      }
      if (!view.contiguous) view.scatter(row, o, pw);
    }
  });
}

void split_(torch::Tensor w, torch::Tensor planes, torch::Tensor stash) { move_pruned(w, planes, stash, true); }

void join_(torch::Tensor w, torch::Tensor planes, torch::Tensor stash) { move_pruned(w, planes, stash, false); }

// ---- kept-index codes (maxq.core.codes): a hard N:M mask as the n kept positions of every block ----------------
// Row o's G = L / m blocks in the order g = (i / m) * K + k; block g's kept positions x_0 < ... < x_{n-1} (weights
// (g / K * m + x) * K + g % K of the row) are entries g * n + t of the row's code, b = ceil(log2 m) bits each, lowest
// first in one bit stream; rows padded to whole bytes (Cb = ceil(G * n * b / 8)).

inline int index_bits(int64_t m) {
  int b = 1;
  while ((int64_t(1) << b) < m) ++b;
  return b;
}

struct CodeShape {
  int64_t O, L, K, n, m, Lb, Cb;
  int b;
};

CodeShape code_shape(const torch::Tensor& code, const torch::Tensor& planes, int64_t n, int64_t m, int64_t L,
                     int64_t K) {
  TORCH_CHECK(n >= 1 && n < m && K >= 1 && L % (m * K) == 0, "kept-index code: a row of ", L,
              " entries is no whole number of ", m, "-blocks at ", K, " kernel positions");
  CodeShape s{0, L, K, n, m, (L + 7) / 8, 0, index_bits(m)};
  s.Cb = (L / m * n * s.b + 7) / 8;
  TORCH_CHECK(code.device().is_cpu() && code.scalar_type() == torch::kUInt8 && code.is_contiguous() &&
                  code.dim() >= 2 && code.size(-1) == s.Cb,
              "code must be a contiguous uint8 CPU tensor of [..., O, ", s.Cb, "] bytes");
  s.O = code.size(-2);
  TORCH_CHECK(planes.device().is_cpu() && planes.scalar_type() == torch::kUInt8 && planes.is_contiguous() &&
                  planes.numel() == s.O * s.Lb,
              "planes must be a contiguous uint8 CPU tensor of [1, ", s.O, ", ", s.Lb, "] bytes");
  return s;
}

// A row's code read entry by entry, b bits each, lowest first (a 64-bit buffer refilled a byte at a time; never
// reads past the row).
struct BitReader {
  const uint8_t* p;
  const uint8_t* end;
  uint64_t buf = 0;
  int have = 0;
  BitReader(const uint8_t* row, int64_t bytes) : p(row), end(row + bytes) {}
  inline int64_t next(int b) {
    while (have < b) {
      buf |= static_cast<uint64_t>(p < end ? *p++ : 0) << have;
      have += 8;
    }
    const int64_t x = static_cast<int64_t>(buf & ((uint64_t(1) << b) - 1));
    buf >>= b;
    have -= b;
    return x;
  }
};

// OR x (b bits) into a zeroed row at bit `pos`.
inline void write_bits(uint8_t* row, int64_t pos, int64_t x, int b) {
  uint8_t* p = row + (pos >> 3);
  const int shift = static_cast<int>(pos & 7), bytes = (shift + b + 7) / 8;
  const uint64_t v = static_cast<uint64_t>(x) << shift;
  for (int q = 0; q < bytes; ++q) p[q] = static_cast<uint8_t>(p[q] | (v >> (8 * q)));
}

// The bit plane of the kept weights from their code (every bit of `planes` written): one read a kept weight.
void decode_kept_(torch::Tensor code, torch::Tensor planes, int64_t n, int64_t m, int64_t L, int64_t K) {
  const CodeShape s = code_shape(code, planes, n, m, L, K);
  const uint8_t* pc = code.data_ptr<uint8_t>();
  uint8_t* pp = planes.data_ptr<uint8_t>();
  std::atomic<bool> bad{false};
  at::parallel_for(0, s.O, row_grain(L), [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const uint8_t* crow = pc + o * s.Cb;
      uint8_t* prow = pp + o * s.Lb;
      std::memset(prow, 0, s.Lb);
      BitReader reader(crow, s.Cb);
      for (int64_t base_i = 0; base_i < L; base_i += m * K) {  // block (i / m, k) starts at entry base_i + k
        for (int64_t k = 0; k < K; ++k) {
          for (int64_t t = 0; t < n; ++t) {
            const int64_t x = reader.next(s.b);
            if (x >= m) {
              bad.store(true, std::memory_order_relaxed);
              continue;
            }
            set_bit(prow, base_i + k + x * K);
          }
        }
      }
    }
  });
  TORCH_CHECK(!bad.load(), "kept-index code holds a position >= m = ", m, ": the mask state is corrupt");
}

// The code of a bit plane of kept weights; every block must keep exactly n. Walks the set bits only (ascending, so
// a block's positions come in order): a word of 64 flags at a time.
void encode_kept_(torch::Tensor planes, torch::Tensor code, int64_t n, int64_t m, int64_t L, int64_t K) {
  const CodeShape s = code_shape(code, planes, n, m, L, K);
  const uint8_t* pp = planes.data_ptr<uint8_t>();
  uint8_t* pc = code.data_ptr<uint8_t>();
  const int64_t G = L / m;
  std::atomic<bool> bad{false};
  at::parallel_for(0, s.O, row_grain(L), [&](int64_t o0, int64_t o1) {
    std::vector<int64_t> count(G);
    for (int64_t o = o0; o < o1; ++o) {
      const uint8_t* prow = pp + o * s.Lb;
      uint8_t* crow = pc + o * s.Cb;
      std::memset(crow, 0, s.Cb);
      std::fill(count.begin(), count.end(), 0);
      bool row_bad = false;
      for (int64_t w0 = 0; w0 < s.Lb; w0 += 8) {
        uint64_t word = 0;
        std::memcpy(&word, prow + w0, static_cast<size_t>(std::min<int64_t>(8, s.Lb - w0)));
        while (word) {
          const int64_t j = w0 * 8 + __builtin_ctzll(word);
          word &= word - 1;
          if (j >= L) {  // a padding bit set: not a plane of this layer
            row_bad = true;
            continue;
          }
          const int64_t i = j / K, k = j - i * K, block_i = i / m, x = i - block_i * m, g = block_i * K + k;
          const int64_t t = count[g]++;
          if (t < n) write_bits(crow, (g * n + t) * s.b, x, s.b);
        }
      }
      for (int64_t g = 0; g < G && !row_bad; ++g) row_bad = count[g] != n;
      if (row_bad) bad.store(true, std::memory_order_relaxed);
    }
  });
  TORCH_CHECK(!bad.load(), "a block keeps other than n = ", n, " of its m = ", m,
              " weights: a kept-index code holds exactly n a block");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("mask_", &mask_, "MaxQ mask of one layer in two passes (see the file header)");
  mod.def("decay_", &decay_, "SR-STE decay on pruned weights");
  mod.def("apply_", &apply_, "the mask, or W * mask, from the mask state (bit planes, thresholds)");
  mod.def("decay_bits_", &decay_bits_, "SR-STE decay on pruned weights, from the kept bits");
  mod.def("mask_grad_", &mask_grad_, "grad *= kept bits, in place");
  mod.def("split_", &split_, "the pruned weights to a stash, then w *= kept bits, in place");
  mod.def("join_", &join_, "the pruned weights back from the stash, in place");
  mod.def("decode_kept_", &decode_kept_, "the kept bit plane from its kept-index code");
  mod.def("encode_kept_", &encode_kept_, "the kept-index code of a kept bit plane");
}
