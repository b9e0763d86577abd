"""Kernels for the two hot paths: Triton for GPU (`compaction`: selection and fitting statistics;
`paged`: vLLM's paged GPU KV layout and biased attention; never run on a GPU yet, tested on the
CPU under TRITON_INTERPRET=1) and the native CPU biased attention from csrc/ (`cpu`)."""
