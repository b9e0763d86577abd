// The native CPU kernels that module.cpp exposes to Python (vllm_compaction/kernels/cpu.py).

#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

// biased_attention.cpp: causal attention over vLLM's CPU paged KV cache, writing out[start:end]
// of each batch row in `rows`, with biases[i] [H_kv, S] added to the logits of its first S slots.
void biased_attention(torch::Tensor out, const torch::Tensor& query,
                      const torch::Tensor& kv_cache, const torch::Tensor& block_table,
                      const torch::Tensor& query_start_loc, const torch::Tensor& seq_lens,
                      const std::vector<int64_t>& rows, const std::vector<torch::Tensor>& biases,
                      const std::vector<torch::Tensor>& pages,
                      const std::vector<int64_t>& region_slots, double scale);

// attention_statistics.cpp: one pass of reference queries over a layer's keys, returning
// (shift, mass, inverse_total, targets, squares) as Problem._statistics defines them.
std::vector<torch::Tensor> attention_statistics(const torch::Tensor& queries,
                                                const torch::Tensor& keys,
                                                const torch::Tensor& values,
                                                const torch::Tensor& bias,
                                                const torch::Tensor& positions,
                                                const torch::Tensor& outside, double scale);
