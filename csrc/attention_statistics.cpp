// The attention statistics every compaction method reads (vllm_compaction/core/problem.py,
// Problem._statistics), in one pass of n reference queries over a layer's T keys:
//   s_ij  = scale q_i . k_j + bias_j, -inf for keys after query i's position
//   shift_i = max_j s_ij (0 when the query sees no key), E_ij = exp(s_ij - shift_i)
//   mass_i = sum_j E_ij, total_i = 1 / (mass_i + exp(outside_i - shift_i)) (0 if mass_i = 0)
//   targets_i = sum_j E_ij v_j / mass_i, squares_j = sum_i (E_ij total_i)^2
//
// The torch version forms [H, 128, T] blocks of E and streams each through memory about ten
// times (product, scale, mask, max, exp, sum, value product, square, column sums); here a tile
// of kTileRows queries keeps its score rows in L2 while all of that happens, and the products
// use simd.h's register-blocked micro-kernels.
//
// Work items are (KV head, slab of kSlabRows queries), run by one thread tile after tile. Each
// slab adds its squared weights into its own row of a [H, slabs, T] buffer that is summed in
// slab order afterwards, so results do not depend on the thread count or schedule.

#include <omp.h>

#include <cmath>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace {

using namespace vllm_compaction;

constexpr int64_t kKeyBlock = 128;  // keys per block of the transposed copy K^T [D, block]
constexpr int64_t kTileRows = 32;   // query rows whose score rows (32 x T floats) stay in L2
constexpr int64_t kSlabRows = 256;  // query rows per work item (and per row of partial squares)

struct Layer {
  const float* queries;      // [H, n, D]
  const float* keys_t;       // [H, blocks, D, kKeyBlock], zero past T
  const float* values;       // [H, T, Dv]
  const float* bias;         // [H, T] or null
  const int64_t* positions;  // [H, n] or null (every query sees every key)
  const float* outside;      // [H, n] log mass elsewhere, or null
  int64_t heads, n, length, d_size, dv_size, blocks;
  float scale;
};

struct Results {
  float *shift, *mass, *inverse_total, *targets;  // [H, n], [H, n], [H, n], [H, n, Dv]
  float* partial_squares;                         // [H, slabs, blocks * kKeyBlock]
};

// Keys query i of head h sees: those at positions <= its own.
inline int64_t visible_keys(const Layer& layer, int64_t h, int64_t i) {
  if (layer.positions == nullptr) return layer.length;
  return std::clamp<int64_t>(layer.positions[h * layer.n + i] + 1, 0, layer.length);
}

// Rows [first, first + rows) of head h: scores, softmax statistics, targets, squared weights.
void statistics_tile(const Layer& layer, const Results& out, int64_t h, int64_t first,
                     int64_t rows, float* squares, std::vector<float>& q,
                     std::vector<float>& s, std::vector<float>& acc) {
  const int64_t d_size = layer.d_size, dv_size = layer.dv_size;
  int64_t seen = 0;  // keys the tile's furthest-seeing query sees
  for (int64_t r = 0; r < rows; ++r) seen = std::max(seen, visible_keys(layer, h, first + r));
  const int64_t width = (seen + kLanes - 1) / kLanes * kLanes;  // score row stride
  const float* src = layer.queries + (h * layer.n + first) * d_size;
  std::copy(src, src + rows * d_size, q.begin());
  s.resize(rows * width);
  for (int64_t b = 0; b * kKeyBlock < width; ++b) {
    const float* kt = layer.keys_t + (h * layer.blocks + b) * d_size * kKeyBlock;
    const int64_t chunks = std::min(kKeyBlock, width - b * kKeyBlock) / kLanes;
    for_row_groups(rows, [&](auto R, int64_t r0) {
      scores_rows<R.value>(q.data() + r0 * d_size, kt, d_size, kKeyBlock, chunks,
                           s.data() + r0 * width + b * kKeyBlock, width);
    });
  }
  const float* bias = layer.bias == nullptr ? nullptr : layer.bias + h * layer.length;
  std::vector<float> total(rows), inverse(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = h * layer.n + first + r;
    float* sr = s.data() + r * width;
    const int64_t visible = visible_keys(layer, h, first + r);
    // Scaled after the product, as torch's baddbmm does: the fits recompute kept columns'
    // scores that way, and with every key kept their sums must meet these masses closely.
    if (bias != nullptr)
      for (int64_t j = 0; j < visible; ++j) sr[j] = sr[j] * layer.scale + bias[j];
    else
      for (int64_t j = 0; j < visible; ++j) sr[j] *= layer.scale;
    std::fill(sr + visible, sr + width, kNegInf);
    Vec row_max = splat(kNegInf);
    for (int64_t j = 0; j < width; j += kLanes) {
      const Vec x = load(sr + j);
      row_max = x > row_max ? x : row_max;
    }
    float shift = max_lane(row_max);
    if (shift == kNegInf) shift = 0.0f;  // sees no key: E is 0, and so is everything below
    Vec row_sum = {};
    for (int64_t j = 0; j < width; j += kLanes) {
      const Vec e = exp_nonpositive(load(sr + j) - shift);
      store(sr + j, e);
      row_sum += e;
    }
    const float mass = sum_lanes(row_sum);
    inverse[r] = mass > 0.0f ? 1.0f / mass : 0.0f;
    total[r] = inverse[r];
    if (layer.outside != nullptr && mass > 0.0f)
      total[r] = 1.0f / (mass + std::exp(layer.outside[i] - shift));
    out.shift[i] = shift;
    out.mass[i] = mass;
    out.inverse_total[i] = total[r];
  }
  std::fill(acc.begin(), acc.begin() + rows * dv_size, 0.0f);
  const float* v = layer.values + h * layer.length * dv_size;
  // Block by block, so each block of values is read from memory once for the whole tile.
  for (int64_t j = 0; j < seen; j += kKeyBlock) {
    const int64_t count = std::min(kKeyBlock, seen - j);
    for_row_groups(rows, [&](auto R, int64_t r0) {
      values_rows<R.value>(s.data() + r0 * width + j, width, v + j * dv_size, dv_size, count,
                           acc.data() + r0 * dv_size);
    });
  }
  float* targets = out.targets + (h * layer.n + first) * dv_size;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < dv_size; ++c)
      targets[r * dv_size + c] = acc[r * dv_size + c] * inverse[r];
  for (int64_t r = 0; r < rows; ++r) {
    const float* er = s.data() + r * width;
    for (int64_t j = 0; j < width; j += kLanes) {
      const Vec w = load(er + j) * total[r];
      store(squares + j, load(squares + j) + w * w);
    }
  }
}

}  // namespace

std::vector<torch::Tensor> attention_statistics(const torch::Tensor& queries,
                                                const torch::Tensor& keys,
                                                const torch::Tensor& values,
                                                const torch::Tensor& bias,
                                                const torch::Tensor& positions,
                                                const torch::Tensor& outside, double scale) {
  TORCH_CHECK(queries.dim() == 3 && keys.dim() == 3 && values.dim() == 3,
              "queries [H, n, D], keys [H, T, D] and values [H, T, Dv] expected");
  const int64_t heads = keys.size(0), length = keys.size(1), d_size = keys.size(2);
  const int64_t n = queries.size(1), dv_size = values.size(2);
  TORCH_CHECK(queries.size(0) == heads && values.size(0) == heads && values.size(1) == length &&
                  queries.size(2) == d_size,
              "queries, keys and values disagree on heads, length or head size");
  TORCH_CHECK(d_size % kLanes == 0 && dv_size % kLanes == 0,
              "head sizes must be multiples of ", kLanes);
  for (const auto* t : {&queries, &keys, &values, &bias, &outside})
    TORCH_CHECK(t->numel() == 0 || t->scalar_type() == torch::kFloat32, "float32 inputs expected");
  TORCH_CHECK(bias.numel() == 0 || (bias.dim() == 2 && bias.size(0) == heads &&
                                    bias.size(1) == length),
              "bias must be [H, T]");
  TORCH_CHECK(positions.numel() == 0 || (positions.scalar_type() == torch::kInt64 &&
                                         positions.dim() == 2 && positions.size(0) == heads &&
                                         positions.size(1) == n),
              "positions must be int64 [H, n]");
  TORCH_CHECK(outside.numel() == 0 || (outside.dim() == 2 && outside.size(0) == heads &&
                                       outside.size(1) == n),
              "outside must be [H, n]");

  const int64_t blocks = (length + kKeyBlock - 1) / kKeyBlock;
  // [H, blocks, D, kKeyBlock]: a vector of consecutive keys per head dimension, as the score
  // micro-kernel reads them; zero keys past T are masked like future ones.
  const auto keys_t = torch::constant_pad_nd(keys, {0, 0, 0, blocks * kKeyBlock - length})
                          .view({heads, blocks, kKeyBlock, d_size})
                          .transpose(2, 3)
                          .contiguous();
  const auto q = queries.contiguous(), v = values.contiguous();
  const auto b = bias.contiguous(), p = positions.contiguous(), o = outside.contiguous();
  const auto options = queries.options();
  auto shift = torch::empty({heads, n}, options), mass = torch::empty({heads, n}, options);
  auto inverse_total = torch::empty({heads, n}, options);
  auto targets = torch::empty({heads, n, dv_size}, options);
  const int64_t slabs = (n + kSlabRows - 1) / kSlabRows;
  // Rows padded to whole vectors: a tile's score rows are, and it adds them whole.
  const int64_t padded = blocks * kKeyBlock;
  auto partial = torch::zeros({heads, slabs, padded}, options);

  const Layer layer{q.data_ptr<float>(),
                    keys_t.data_ptr<float>(),
                    v.data_ptr<float>(),
                    b.numel() == 0 ? nullptr : b.data_ptr<float>(),
                    p.numel() == 0 ? nullptr : p.data_ptr<int64_t>(),
                    o.numel() == 0 ? nullptr : o.data_ptr<float>(),
                    heads, n, length, d_size, dv_size, blocks, static_cast<float>(scale)};
  const Results results{shift.data_ptr<float>(), mass.data_ptr<float>(),
                        inverse_total.data_ptr<float>(), targets.data_ptr<float>(),
                        partial.data_ptr<float>()};
  const int64_t items = heads * slabs;
#pragma omp parallel
  {
    std::vector<float> q_tile(kTileRows * d_size), scores, acc(kTileRows * dv_size);
    // Dynamic: with causal positions a slab's cost grows with its position.
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t h = item / slabs, slab = item % slabs;
      const int64_t end = std::min(n, (slab + 1) * kSlabRows);
      float* squares = results.partial_squares + item * padded;
      for (int64_t first = slab * kSlabRows; first < end; first += kTileRows)
        statistics_tile(layer, results, h, first, std::min(kTileRows, end - first), squares,
                        q_tile, scores, acc);
    }
  }
  const auto squares = partial.sum(1).narrow(1, 0, length).contiguous();
  return {shift, mass, inverse_total, targets, squares};
}
