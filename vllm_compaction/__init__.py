"""Attention Matching KV-cache compaction served by vLLM."""
