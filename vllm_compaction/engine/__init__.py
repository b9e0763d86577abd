"""vLLM glue: one module per extension point. Imported only inside vLLM processes.

The names below are what a vLLM command line needs; importing them loads no vLLM code.
"""

WORKER_EXTENSION = "vllm_compaction.engine.worker.CompactionWorkerExtension"
CONNECTOR_CONFIG = {
    "kv_connector": "CompactionConnector",
    "kv_connector_module_path": "vllm_compaction.engine.connector",
    "kv_role": "kv_both",
    "kv_load_failure_policy": "fail",  # a handle a worker lacks fails its request
}
