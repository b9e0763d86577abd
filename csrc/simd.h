// SIMD building blocks shared by the native CPU kernels: a one-register float vector, loads
// that widen bf16/fp16 to fp32, an exp for non-positive arguments, and register-blocked
// micro-kernels for query-key scores and weighted value sums.
//
// Vec is a GCC/Clang vector type of one register's floats (16 with AVX-512, 8 with AVX2) that
// -march=native compiles to single instructions; -ffp-contract=fast fuses the multiply-adds.

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace vllm_compaction {

// Floats per vector, and query rows sharing one load of a key or value vector: a micro-kernel
// holds rows x 2 accumulators, 2 loaded vectors and a broadcast, which must fit the register
// file (32 AVX-512 registers; AVX2's 16 take 6 rows, 15 registers as in BLIS's Haswell sgemm:
// 1.6x the FLOP rate of 4 rows here, while 8 rows spilled and ran ~10x slower).
#ifdef __AVX512F__
constexpr int64_t kLanes = 16;
constexpr int64_t kMaxRowGroup = 8;
#else
constexpr int64_t kLanes = 8;
constexpr int64_t kMaxRowGroup = 6;
#endif
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// kLanes floats as one value (GCC/Clang vector extension): +, *, ?: and compares act per lane
// and compile to single vector instructions; `scalar * Vec` broadcasts.
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec splat(float x) { return Vec{} + x; }

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// bf16 is the top half of an fp32: widen the bits and shift them up.
inline Vec load(const c10::BFloat16* p) {
  typedef uint16_t Bits16 __attribute__((vector_size(kLanes * sizeof(uint16_t))));
  typedef uint32_t Bits32 __attribute__((vector_size(kLanes * sizeof(uint32_t))));
  Bits16 bits;
  std::memcpy(&bits, p, sizeof bits);
  return reinterpret_cast<Vec>(__builtin_convertvector(bits, Bits32) << 16);
}

inline Vec load(const c10::Half* p) {
  typedef _Float16 Half16 __attribute__((vector_size(kLanes * sizeof(_Float16))));
  Half16 halves;
  std::memcpy(&halves, p, sizeof halves);
  return __builtin_convertvector(halves, Vec);
}

inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

// exp(x) for x <= 0 (arguments are score - running max), relative error ~1e-7; exactly 0 at
// -inf. Own polynomial because libm's expf does not vectorise without -ffast-math, and
// -ffast-math would assume away the -inf of masked and padding slots.
inline Vec exp_nonpositive(Vec x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // ln 2 = kLn2Hi + kLn2Lo, kLn2Hi exact in few bits
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  x = x > -88.0f ? x : splat(-88.0f);    // so 2^k below ends at 2^-127, whose bits are 0
  const Vec k = (x * kLog2e + kRound) - kRound;
  const Vec r = (x - k * kLn2Hi) - k * kLn2Lo;  // |r| <= ln(2) / 2
  Vec p = splat(1.0f / 5040);
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    p = p * r + c;
  const IVec exponent = __builtin_convertvector(k, IVec) + 127;
  return p * reinterpret_cast<Vec>(exponent << 23);
}

inline float exp_nonpositive(float x) { return exp_nonpositive(splat(x))[0]; }

// s[r, j] = q[r, :] . kt[:, j] for R rows and C vectors of columns j (kt: keys [D, B] of one
// block, from the first column). Each q[r, d] loaded serves C multiply-adds.
template <int64_t R, int64_t C, typename cache_t>
void scores_tile(const float* q, const cache_t* kt, int64_t d_size, int64_t block_size,
                 float* s, int64_t s_stride) {
  Vec acc[R][C] = {};
  for (int64_t d = 0; d < d_size; ++d) {
    Vec k[C];
    for (int64_t c = 0; c < C; ++c) k[c] = load(kt + d * block_size + c * kLanes);
    for (int64_t r = 0; r < R; ++r) {
      const float qrd = q[r * d_size + d];
      for (int64_t c = 0; c < C; ++c) acc[r][c] += qrd * k[c];
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) store(s + r * s_stride + c * kLanes, acc[r][c]);
}

// Scores of R rows for the block's first `chunks` vectors of columns.
template <int64_t R, typename cache_t>
void scores_rows(const float* q, const cache_t* kt, int64_t d_size, int64_t block_size,
                 int64_t chunks, float* s, int64_t s_stride) {
  int64_t c = 0;
  for (; c + 2 <= chunks; c += 2)
    scores_tile<R, 2>(q, kt + c * kLanes, d_size, block_size, s + c * kLanes, s_stride);
  if (c < chunks)
    scores_tile<R, 1>(q, kt + c * kLanes, d_size, block_size, s + c * kLanes, s_stride);
}

// acc[r, :] += sum_{j < count} p[r, j] * v[j, :] for R rows and C vectors of acc's columns (v:
// values [B, D] of one block, from the first column). Each p[r, j] loaded serves C multiply-adds.
template <int64_t R, int64_t C, typename cache_t>
void values_tile(const float* p, int64_t block_size, const cache_t* v, int64_t d_size,
                 int64_t count, float* acc) {
  Vec sum[R][C];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) sum[r][c] = load(acc + r * d_size + c * kLanes);
  for (int64_t j = 0; j < count; ++j) {
    Vec vj[C];
    for (int64_t c = 0; c < C; ++c) vj[c] = load(v + j * d_size + c * kLanes);
    for (int64_t r = 0; r < R; ++r) {
      const float prj = p[r * block_size + j];
      for (int64_t c = 0; c < C; ++c) sum[r][c] += prj * vj[c];
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) store(acc + r * d_size + c * kLanes, sum[r][c]);
}

// Weighted values of R rows, over all D columns.
template <int64_t R, typename cache_t>
void values_rows(const float* p, int64_t block_size, const cache_t* v, int64_t d_size,
                 int64_t count, float* acc) {
  int64_t c = 0;
  for (; (c + 2) * kLanes <= d_size; c += 2)
    values_tile<R, 2>(p, block_size, v + c * kLanes, d_size, count, acc + c * kLanes);
  if (c * kLanes < d_size)
    values_tile<R, 1>(p, block_size, v + c * kLanes, d_size, count, acc + c * kLanes);
}

inline float max_lane(Vec v) {
  float out = v[0];
  for (int64_t i = 1; i < kLanes; ++i) out = std::max(out, v[i]);
  return out;
}

inline float sum_lanes(Vec v) {
  float out = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) out += v[i];
  return out;
}

// Calls fn(std::integral_constant<int64_t, R>, first_row) over rows in groups of R <= 8, so
// the micro-kernels above see their row count at compile time.
template <typename Fn>
void for_row_groups(int64_t rows, Fn&& fn) {
  int64_t r = 0;
  for (; r + kMaxRowGroup <= rows; r += kMaxRowGroup)
    fn(std::integral_constant<int64_t, kMaxRowGroup>{}, r);
  switch (rows - r) {
    case 1: fn(std::integral_constant<int64_t, 1>{}, r); break;
    case 2: fn(std::integral_constant<int64_t, 2>{}, r); break;
    case 3: fn(std::integral_constant<int64_t, 3>{}, r); break;
    case 4: fn(std::integral_constant<int64_t, 4>{}, r); break;
    case 5: fn(std::integral_constant<int64_t, 5>{}, r); break;
    case 6: fn(std::integral_constant<int64_t, 6>{}, r); break;
    case 7: fn(std::integral_constant<int64_t, 7>{}, r); break;
    default: break;
  }
}

}  // namespace vllm_compaction
