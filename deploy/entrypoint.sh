#!/bin/sh
# The images' command (deploy/Dockerfile): serve the model pulled into the image on port 8000 of
# every interface, with handles on the volume. Arguments are appended, so they add any vLLM flag
# or one of ours (--api-keys-file, --seal-key-file, ...) and override a flag given here (the last
# occurrence wins). exec: SIGTERM reaches vLLM, which shuts down cleanly.
set -eu
exec vllm-compaction serve "$VLLM_COMPACTION_MODEL" --host 0.0.0.0 --port 8000 \
  --handles-dir /data/handles "$@"
