"""herd's node-side runtime, grouped by concern:

- `runtime.planning`: the spec, the model and hardware catalog, architectures, the planner, its report;
- `runtime.serving`: the launcher and supervisor, the HTTP front, metrics, text, TLS, smoke and batch clients;
- `runtime.engine`: what each rank runs (placement, the lockstep decode loop, sampling, KV slots, vLLM).

Installs on a GPU node without pulumi or cloud SDKs; nothing here imports `provisioning` or `infra`
(imports flow infra -> provisioning -> runtime).
"""
