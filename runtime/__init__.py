"""herd's node-side runtime: spec, catalog, planner, launcher, server, smoke.

Installs on a GPU node without pulumi or cloud SDKs; nothing here imports
`provisioning` or `infra` (imports flow infra -> provisioning -> runtime).
"""
