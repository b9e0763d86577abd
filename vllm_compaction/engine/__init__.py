"""vLLM glue: one module per extension point. Imported only inside vLLM processes."""
