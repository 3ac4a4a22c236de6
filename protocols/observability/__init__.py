"""What an operator sees of a running node or hub: health, metrics, structured logs.

metrics: Prometheus metrics (a per-process registry and a gRPC server interceptor);
health: the gRPC health service and graceful drain; logs: JSON log lines;
listeners: the optional plaintext health and /metrics listeners and their settings.
docs/observability.md describes every metric, the health and drain behaviour and the logs.
"""
