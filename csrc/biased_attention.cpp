// Causal attention over vLLM's CPU paged KV cache, with a per-slot bias on a sequence's first S
// slots (the slots of a compacted handle). One call serves several sequences of a batch.
//
// A handle with per-head budgets packs its heads' rows into pages (vllm_compaction/engine/
// pages.py): head h then reads its P pages first, then the sequence's slots after the handle's
// region. Positions below are logical: P * block_size + (slot - region slots) for those.
//
// Cache layout (vLLM CPU, [num_blocks, H_kv, block_size, 2 * D]): per block and KV head, keys
// stored transposed as [D, block_size], then values as [block_size, D].
//
// Work is split into items (sequence, KV head, tile of query tokens, range of KV blocks). An item
// runs every query head of its KV head's group over the tile, so each key and value it reads is
// used by all of them, and keeps an online softmax (running max m, sum l, output acc) in fp32.
// Decode has few items, so their KV range is split and the partial softmaxes merged afterwards.
//
// The inner loops are simd.h's micro-kernels; keys and values are widened to fp32 as loaded.

#include <omp.h>

#include "kernels.h"
#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

using namespace vllm_compaction;

constexpr int64_t kTileRows = 64;       // query rows (tokens x heads of a group) per item
constexpr int64_t kMinSplitSlots = 256; // keys per item at least, when the KV range is split

// One row's online-softmax step over a block: turns its scores s[0, chunks * kLanes) into
// weights in place (0 from slot `seen` on: causally hidden or past the sequence) and rescales
// the row's state (max m, sum l, acc [D]) to the new running max.
inline void online_softmax(float* s, int64_t chunks, int64_t seen, float& m, float& l, float* acc,
                           int64_t d_size) {
  Vec lane;
  for (int64_t i = 0; i < kLanes; ++i) lane[i] = static_cast<float>(i);
  const Vec minus_inf = splat(kNegInf);
  Vec block_max = minus_inf;
  for (int64_t c = 0; c < chunks; ++c) {
    Vec x = load(s + c * kLanes);
    x = lane + static_cast<float>(c * kLanes) < static_cast<float>(seen) ? x : minus_inf;
    store(s + c * kLanes, x);
    block_max = x > block_max ? x : block_max;
  }
  const float new_max = std::max(m, max_lane(block_max));
  if (new_max == kNegInf) {  // nothing visible yet (or only padding): weights 0, state as is
    std::fill(s, s + chunks * kLanes, 0.0f);
    return;
  }
  Vec block_sum = {};
  for (int64_t c = 0; c < chunks; ++c) {
    const Vec w = exp_nonpositive(load(s + c * kLanes) - new_max);
    store(s + c * kLanes, w);
    block_sum += w;
  }
  const float rescale = exp_nonpositive(m - new_max);
  l = l * rescale + sum_lanes(block_sum);
  for (int64_t d = 0; d < d_size; ++d) acc[d] *= rescale;
  m = new_max;
}

struct Sequence {
  int64_t query_start;  // its first token in query/out
  int64_t num_queries;  // n: its queries sit at positions length - n .. length - 1
  int64_t length;       // L: cached slots (logical), its new tokens included
  const int32_t* blocks;
  const float* bias;    // [H_kv, slots]
  int64_t slots;        // S: biased slots
  const int64_t* pages = nullptr;  // [H_kv, num_pages] packed heads, or none
  int64_t num_pages = 0;
  int64_t region_blocks = 0;       // blocks the packed handle occupies
};

// Offset in pages (block * H_kv + head) of logical block b of a KV head; -1: an empty page.
inline int64_t page_of(const Sequence& seq, int64_t b, int64_t kv_head, int64_t kv_heads) {
  if (seq.pages != nullptr) {
    if (b < seq.num_pages) {
      const int64_t page = seq.pages[kv_head * seq.num_pages + b];
      return page < 0 ? -1 : int64_t{seq.blocks[page / kv_heads]} * kv_heads + page % kv_heads;
    }
    b += seq.region_blocks - seq.num_pages;
  }
  return int64_t{seq.blocks[b]} * kv_heads + kv_head;
}

// One sequence, KV head and tile of query tokens; its KV range may be split into several items.
struct Task {
  int64_t seq, kv_head, token_begin, token_end;
  int64_t first_item, num_items;
};

struct Item {
  int64_t task, block_begin, block_end;
  int64_t partial;  // first row of its partial results
};

struct Shape {
  int64_t heads, kv_heads, group, d_size, block_size;
};

// Partial softmax state per (item, row): running max, sum of weights, weighted value sum [D].
struct Partials {
  std::vector<float> max, sum, acc;
};

template <typename scalar_t>
void attend_item(const Item& item, const Task& task, const Sequence& seq, const Shape& shape,
                 const scalar_t* query, int64_t q_token_stride, int64_t q_head_stride,
                 const scalar_t* cache, float scale, Partials& partials) {
  const int64_t d_size = shape.d_size, block_size = shape.block_size, group = shape.group;
  const int64_t rows = (task.token_end - task.token_begin) * group;
  // Row r is token token_begin + r / group, query head kv_head * group + r % group.
  std::vector<float> q(rows * d_size), s(rows * block_size);
  std::vector<int64_t> position(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = task.token_begin + r / group;
    const int64_t head = task.kv_head * group + r % group;
    const scalar_t* src =
        query + (seq.query_start + token) * q_token_stride + head * q_head_stride;
    for (int64_t d = 0; d < d_size; ++d) q[r * d_size + d] = static_cast<float>(src[d]) * scale;
    position[r] = seq.length - seq.num_queries + token;
  }
  float* m = partials.max.data() + item.partial;
  float* l = partials.sum.data() + item.partial;
  float* acc = partials.acc.data() + item.partial * d_size;
  std::fill(m, m + rows, kNegInf);
  std::fill(l, l + rows, 0.0f);
  std::fill(acc, acc + rows * d_size, 0.0f);
  const float* bias = seq.bias + task.kv_head * seq.slots;
  const int64_t last_position = position[rows - 1];

  for (int64_t b = item.block_begin; b < item.block_end; ++b) {
    const int64_t first_slot = b * block_size;
    // Slots of this block that the tile's last query sees; earlier queries see a prefix.
    const int64_t visible = std::min(block_size, last_position + 1 - first_slot);
    if (visible <= 0) break;
    const int64_t page = page_of(seq, b, task.kv_head, shape.kv_heads);
    if (page < 0) continue;  // all its rows are padding (bias -inf)
    const scalar_t* kt = cache + page * 2 * block_size * d_size;
    const scalar_t* v = kt + block_size * d_size;
    const int64_t chunks = (visible + kLanes - 1) / kLanes;
    for_row_groups(rows, [&](auto R, int64_t r0) {
      scores_rows<R.value>(q.data() + r0 * d_size, kt, d_size, block_size, chunks,
                           s.data() + r0 * block_size, block_size);
    });
    const int64_t biased = std::clamp<int64_t>(seq.slots - first_slot, 0, visible);
    for (int64_t r = 0; r < rows; ++r) {
      float* sr = s.data() + r * block_size;
      for (int64_t j = 0; j < biased; ++j) sr[j] += bias[first_slot + j];
      const int64_t seen = std::clamp<int64_t>(position[r] + 1 - first_slot, 0, visible);
      online_softmax(sr, chunks, seen, m[r], l[r], acc + r * d_size, d_size);
    }
    for_row_groups(rows, [&](auto R, int64_t r0) {
      values_rows<R.value>(s.data() + r0 * block_size, block_size, v, d_size, visible,
                           acc + r0 * d_size);
    });
  }
}

// Merges a task's partial softmaxes and writes its rows of out.
template <typename scalar_t>
void finish_task(const Task& task, const Sequence& seq, const Shape& shape,
                 const std::vector<Item>& items, const Partials& partials, scalar_t* out,
                 int64_t o_token_stride, int64_t o_head_stride) {
  const int64_t d_size = shape.d_size, group = shape.group;
  const int64_t rows = (task.token_end - task.token_begin) * group;
  std::vector<float> merged(d_size);
  for (int64_t r = 0; r < rows; ++r) {
    float max = kNegInf;
    for (int64_t i = 0; i < task.num_items; ++i)
      max = std::max(max, partials.max[items[task.first_item + i].partial + r]);
    float sum = 0.0f;
    std::fill(merged.begin(), merged.end(), 0.0f);
    for (int64_t i = 0; i < task.num_items; ++i) {
      const int64_t row = items[task.first_item + i].partial + r;
      // An item that saw no slot of this row has max -inf and weight 0.
      const float weight = exp_nonpositive(partials.max[row] - max);
      sum += weight * partials.sum[row];
      for (int64_t d = 0; d < d_size; ++d) merged[d] += weight * partials.acc[row * d_size + d];
    }
    const int64_t token = task.token_begin + r / group;
    const int64_t head = task.kv_head * group + r % group;
    scalar_t* dst = out + (seq.query_start + token) * o_token_stride + head * o_head_stride;
    for (int64_t d = 0; d < d_size; ++d) dst[d] = static_cast<scalar_t>(merged[d] / sum);
  }
}

// Tiles each sequence's queries, then splits KV ranges until there are a few items per thread.
void plan(const std::vector<Sequence>& seqs, const Shape& shape, std::vector<Task>& tasks,
          std::vector<Item>& items) {
  const int64_t tile_tokens = std::max<int64_t>(1, kTileRows / shape.group);
  for (int64_t i = 0; i < static_cast<int64_t>(seqs.size()); ++i)
    for (int64_t h = 0; h < shape.kv_heads; ++h)
      for (int64_t t = 0; t < seqs[i].num_queries; t += tile_tokens)
        tasks.push_back({i, h, t, std::min(t + tile_tokens, seqs[i].num_queries), 0, 0});
  const int64_t wanted = 8 * omp_get_max_threads();  // evens out the threads' shares
  const int64_t splits_wanted = (wanted + static_cast<int64_t>(tasks.size()) - 1) /
                                std::max<int64_t>(1, static_cast<int64_t>(tasks.size()));
  int64_t partial = 0;
  for (Task& task : tasks) {
    const Sequence& seq = seqs[task.seq];
    const int64_t seen = seq.length - seq.num_queries + task.token_end;  // by the last query
    const int64_t blocks = (seen + shape.block_size - 1) / shape.block_size;
    const int64_t splits =
        std::clamp<int64_t>(std::min(splits_wanted, seen / kMinSplitSlots), 1, blocks);
    task.first_item = static_cast<int64_t>(items.size());
    task.num_items = splits;
    for (int64_t i = 0; i < splits; ++i) {
      items.push_back({static_cast<int64_t>(&task - tasks.data()), blocks * i / splits,
                       blocks * (i + 1) / splits, partial});
      partial += (task.token_end - task.token_begin) * shape.group;
    }
  }
}

template <typename scalar_t>
void run(torch::Tensor& out, const torch::Tensor& query, const torch::Tensor& kv_cache,
         const std::vector<Sequence>& seqs, const Shape& shape, float scale) {
  std::vector<Task> tasks;
  std::vector<Item> items;
  plan(seqs, shape, tasks, items);
  if (items.empty()) return;
  const int64_t partial_rows = items.back().partial +
                               (tasks[items.back().task].token_end -
                                tasks[items.back().task].token_begin) * shape.group;
  Partials partials{std::vector<float>(partial_rows), std::vector<float>(partial_rows),
                    std::vector<float>(partial_rows * shape.d_size)};
  const scalar_t* q = query.data_ptr<scalar_t>();
  const scalar_t* cache = kv_cache.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t num_items = static_cast<int64_t>(items.size());
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  // Dynamic: items differ in cost (causal tiles, uneven splits).
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < num_items; ++i) {
    const Task& task = tasks[items[i].task];
    attend_item<scalar_t>(items[i], task, seqs[task.seq], shape, q, query.stride(0),
                          query.stride(1), cache, scale, partials);
  }
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t t = 0; t < num_tasks; ++t)
    finish_task<scalar_t>(tasks[t], seqs[tasks[t].seq], shape, items, partials, o,
                          out.stride(0), out.stride(1));
}

}  // namespace

// Writes out[start:end] of each batch row in `rows` (its segment of query_start_loc): causal
// attention of its queries over its cached slots, with biases[i] [H_kv, S] added to slots < S.
// pages[i] [H_kv, P] int64 (empty: none) packs row i's first region_slots[i] slots by head;
// its bias is then [H_kv, P * block_size].
void biased_attention(torch::Tensor out, const torch::Tensor& query,
                      const torch::Tensor& kv_cache, const torch::Tensor& block_table,
                      const torch::Tensor& query_start_loc, const torch::Tensor& seq_lens,
                      const std::vector<int64_t>& rows, const std::vector<torch::Tensor>& biases,
                      const std::vector<torch::Tensor>& pages,
                      const std::vector<int64_t>& region_slots, double scale) {
  TORCH_CHECK(query.dim() == 3 && out.dim() == 3 && kv_cache.dim() == 4,
              "query/out must be [T, Hq, D] and kv_cache [blocks, H_kv, block_size, 2D]");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "query/out need a contiguous last dim");
  TORCH_CHECK(out.scalar_type() == query.scalar_type(), "out must have the query dtype");
  TORCH_CHECK(kv_cache.is_contiguous(), "kv_cache must be contiguous");
  TORCH_CHECK(block_table.scalar_type() == torch::kInt32 && block_table.is_contiguous() &&
                  query_start_loc.scalar_type() == torch::kInt32 &&
                  seq_lens.scalar_type() == torch::kInt32,
              "block_table, query_start_loc and seq_lens must be int32 (block_table contiguous)");
  TORCH_CHECK(rows.size() == biases.size() && rows.size() == pages.size() &&
                  rows.size() == region_slots.size(),
              "one bias, page table and region per row");
  const Shape shape{query.size(1), kv_cache.size(1), query.size(1) / kv_cache.size(1),
                    query.size(2), kv_cache.size(2)};
  TORCH_CHECK(shape.heads % shape.kv_heads == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(kv_cache.size(3) == 2 * shape.d_size, "kv_cache last dim must be 2 * head_dim");
  TORCH_CHECK(shape.d_size % kLanes == 0 && shape.block_size % kLanes == 0,
              "head_dim and block_size must be multiples of ", kLanes);

  const auto starts = query_start_loc.contiguous();
  const auto lengths = seq_lens.contiguous();
  std::vector<torch::Tensor> kept;  // keeps contiguous copies alive during the call
  kept.reserve(2 * rows.size());    // references into it must stay valid
  std::vector<Sequence> seqs;
  for (size_t i = 0; i < rows.size(); ++i) {
    const int64_t row = rows[i];
    TORCH_CHECK(row >= 0 && row + 1 < starts.numel() && row < lengths.numel() &&
                    row < block_table.size(0),
                "row ", row, " is not in the batch");
    const torch::Tensor& bias = kept.emplace_back(biases[i].contiguous());
    TORCH_CHECK(bias.scalar_type() == torch::kFloat32 && bias.dim() == 2 &&
                    bias.size(0) == shape.kv_heads,
                "bias must be float32 [H_kv, S]");
    const int64_t start = starts.data_ptr<int32_t>()[row];
    const int64_t n = starts.data_ptr<int32_t>()[row + 1] - start;
    const int64_t length = lengths.data_ptr<int32_t>()[row];
    const int64_t num_blocks = (length + shape.block_size - 1) / shape.block_size;
    TORCH_CHECK(num_blocks <= block_table.size(1), "row ", row, ": block table too short");
    const int32_t* blocks = block_table.data_ptr<int32_t>() + row * block_table.size(1);
    for (int64_t b = 0; b < num_blocks; ++b)
      TORCH_CHECK(0 <= blocks[b] && blocks[b] < kv_cache.size(0), "row ", row, ": block id ",
                  blocks[b], " is not in the cache");
    Sequence seq{start, n, length, blocks, bias.data_ptr<float>(), bias.size(1)};
    if (pages[i].numel() > 0) {
      const torch::Tensor& table = kept.emplace_back(pages[i].contiguous());
      const int64_t region = region_slots[i];
      TORCH_CHECK(table.scalar_type() == torch::kInt64 && table.dim() == 2 &&
                      table.size(0) == shape.kv_heads &&
                      bias.size(1) == table.size(1) * shape.block_size,
                  "row ", row, ": pages must be int64 [H_kv, P] and bias [H_kv, P * block_size]");
      TORCH_CHECK(region % shape.block_size == 0 && 0 < region && region <= length - n,
                  "row ", row, ": the packed region must be whole blocks before its queries");
      seq.region_blocks = region / shape.block_size;
      const int64_t limit = seq.region_blocks * shape.kv_heads;
      const int64_t* entries = table.data_ptr<int64_t>();
      for (int64_t j = 0; j < table.numel(); ++j)
        TORCH_CHECK(-1 <= entries[j] && entries[j] < limit, "row ", row, ": page ", entries[j],
                    " is not in the handle's ", seq.region_blocks, " blocks");
      seq.pages = entries;
      seq.num_pages = table.size(1);
      seq.length = length - region + seq.num_pages * shape.block_size;
    }
    TORCH_CHECK(0 <= n && n <= length && seq.slots <= seq.length,
                "row ", row, ": more queries or bias slots than cached slots");
    if (n == 0) continue;
    seqs.push_back(seq);
  }

  TORCH_CHECK(kv_cache.scalar_type() == query.scalar_type(),
              "kv_cache must have the query dtype (fp8 caches are not supported)");
  const float s = static_cast<float>(scale);
  switch (query.scalar_type()) {
    case torch::kFloat32: return run<float>(out, query, kv_cache, seqs, shape, s);
    case torch::kBFloat16: return run<c10::BFloat16>(out, query, kv_cache, seqs, shape, s);
    case torch::kHalf: return run<c10::Half>(out, query, kv_cache, seqs, shape, s);
    default: TORCH_CHECK(false, "unsupported dtype ", query.scalar_type());
  }
}
