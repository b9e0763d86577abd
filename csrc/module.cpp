// The Python module of the native CPU kernels (built by vllm_compaction/kernels/cpu.py).

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("biased_attention", &biased_attention,
        "Causal attention over vLLM's CPU paged KV cache with a bias on the first slots",
        py::arg("out"), py::arg("query"), py::arg("kv_cache"), py::arg("block_table"),
        py::arg("query_start_loc"), py::arg("seq_lens"), py::arg("rows"), py::arg("biases"),
        py::arg("pages"), py::arg("region_slots"), py::arg("scale"));
  m.def("attention_statistics", &attention_statistics,
        "Row max, mass, inverse total mass, softmax(S) V and summed squared weights of "
        "reference queries over one layer's keys (empty tensors: no bias, positions, outside)",
        py::arg("queries"), py::arg("keys"), py::arg("values"), py::arg("bias"),
        py::arg("positions"), py::arg("outside"), py::arg("scale"));
}
