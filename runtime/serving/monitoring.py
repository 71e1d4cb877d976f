"""`herd monitoring ENV.yaml --out DIR`: Prometheus scrape configuration, alert rules and a Grafana
dashboard for one deployment.

What is written (and why):
- prometheus.yml        one job, `herd`, scraping each serving group's head: herd's /metrics carries
                        herd's own series, the engine's (`vllm:` with engine: vllm) and the GPUs' (NVML),
                        so one target per serving group is enough. Targets come from the environment:
                        the local endpoint; on-prem, the first host (the head serves the API); clouds,
                        the stack's outputs (`herd status ENV --json > outputs.json`, then --outputs)
                        or, when unknown, herd-targets.json (file_sd) to fill in. Prometheus re-reads
                        that file by itself. With an API key, /metrics needs it too: the job reads it
                        from herd-api-key next to prometheus.yml (never written by herd).
- herd-rules.yml        alerts: not ready (or not scraped) for 1 min, 5xx ratio, restarts, the engine's
                        metrics missing, GPU uncorrectable ECC, XID events, a GPU gone.
- grafana-dashboard.json  readiness per replica (ranks loaded, phase), requests, errors, queue, TTFT and
                        token latency, tokens/s, vLLM KV-cache usage and preemptions, GPU gauges.
- README.md             how to run it, and what it cannot see.

Worker nodes of a multi-node group serve no HTTP, so their GPUs are not scraped by this configuration.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from runtime.errors import UserError
from runtime.planning.spec import Spec, load_spec

JOB = "herd"
CONFIG_FILE = "prometheus.yml"
RULES_FILE = "herd-rules.yml"
TARGETS_FILE = "herd-targets.json"
DASHBOARD_FILE = "grafana-dashboard.json"
API_KEY_FILE = "herd-api-key"
DASHBOARD_UID = "herd-serving"
_DURATION = re.compile(r"^[1-9][0-9]*(ms|s|m|h)$")


# ------------------------------------------------------------------ targets
@dataclass
class Targets:
    static: list[str]                 # host:port, known now
    file_sd: bool                     # unknown now: herd-targets.json, filled in later
    note: str                         # how they were found, for README and the CLI


def _head_from_outputs(path: Path) -> str:
    try:
        outputs = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--outputs: {path}: no such file (write it with `herd status ENV --json > FILE`)") from None
    except ValueError as err:
        raise UserError(f"--outputs: {path}: not JSON ({err})") from None
    head = outputs.get("head_address") if isinstance(outputs, dict) else None
    if not head and isinstance(outputs, dict) and outputs.get("node_addresses"):
        head = outputs["node_addresses"][0]
    if not isinstance(head, str) or not head:
        raise UserError(f"--outputs: {path}: has no head_address or node_addresses (the stack's outputs, "
                        "from `herd status ENV --json`)")
    return head


def targets_for(spec: Spec, on_head: bool = False, outputs: Path | None = None,
                extra: list[str] | None = None) -> Targets:
    port = spec.serving.port
    bind = spec.serving.host
    # A front bound to every address (0.0.0.0) answers on loopback too; one bound to a single
    # address answers only there.
    local_addr = "127.0.0.1" if bind in ("0.0.0.0", "::", "localhost") or spec.serving.loopback_only else bind
    static: list[str] = []
    file_sd = False
    if on_head or spec.target == "local":
        static.append(f"{local_addr}:{port}")
        note = "the head's own endpoint (Prometheus runs there)" if on_head else "the local endpoint"
    elif spec.target == "onprem":
        head = spec.onprem_section.hosts[0].address
        if spec.serving.loopback_only:
            static.append(f"127.0.0.1:{port}")
            note = (f"serving.host is {bind}: /metrics answers on the head only, so this Prometheus "
                    f"must run on {head} (or serve on 0.0.0.0 with an API key)")
        else:
            static.append(f"{head}:{port}")
            note = f"the head, onprem.hosts[0] ({head})"
    elif outputs is not None:
        head = _head_from_outputs(outputs)
        static.append(f"{head}:{port}")
        note = f"the head from the stack's outputs ({head})"
    else:
        file_sd = True
        note = (f"{spec.target} node addresses are known once the stack is up: put the head's address "
                f"(`herd status ENV --json`: head_address) with port {port} into {TARGETS_FILE}")
    for target in extra or []:
        if not re.fullmatch(r"[A-Za-z0-9.\-:\[\]]+:[0-9]{1,5}", target):
            raise UserError(f"--target: {target!r}: expected HOST:PORT")
        if target not in static:
            static.append(target)
    return Targets(static, file_sd and not static, note)


# ------------------------------------------------------------------ prometheus.yml
def scrape_config(spec: Spec, targets: Targets, scrape_interval: str = "15s",
                  evaluation_interval: str | None = None) -> dict:
    for name, value in (("--scrape-interval", scrape_interval), ("--evaluation-interval", evaluation_interval)):
        if value is not None and not _DURATION.match(value):
            raise UserError(f"{name}: {value!r}: expected a Prometheus duration such as 15s, 1m, 500ms")
    labels = {"deployment": spec.name, "engine": spec.serving.engine, "role": "head", "node_rank": "0"}
    job: dict = {"job_name": JOB, "metrics_path": "/metrics", "scheme": "http",
                 "scrape_interval": scrape_interval,
                 # Below the interval (Prometheus refuses a timeout above it); herd's own fetch of the
                 # engine's metrics gives up after 2 s, well within.
                 "scrape_timeout": _min_duration(scrape_interval, "10s")}
    if spec.serving.api_key_env or spec.serving.api_key_file:
        # Relative to prometheus.yml. The key itself is never written by herd.
        job["authorization"] = {"type": "Bearer", "credentials_file": API_KEY_FILE}
    if targets.file_sd:
        job["file_sd_configs"] = [{"files": [TARGETS_FILE], "refresh_interval": "1m"}]
    else:
        job["static_configs"] = [{"targets": targets.static, "labels": labels}]
    return {"global": {"scrape_interval": scrape_interval,
                       "evaluation_interval": evaluation_interval or scrape_interval},
            "rule_files": [RULES_FILE],
            "scrape_configs": [job]}


def _seconds(duration: str) -> float:
    match = re.match(r"^([0-9]+)(ms|s|m|h)$", duration)
    if match is None:
        raise ValueError(f"{duration!r}: not a Prometheus duration such as 15s (allowed units: ms, s, m, h)")
    number, unit = match.groups()
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def _min_duration(a: str, b: str) -> str:
    return a if _seconds(a) <= _seconds(b) else b


# ------------------------------------------------------------------ alert rules
def alert_rules() -> dict:
    sel = f'job="{JOB}"'
    by = "deployment, instance"
    rules = [
        {"alert": "HerdNotReady",
         # Not ready, or not answering at all (a dead server has no herd_ready: `up` says it).
         "expr": f"max by ({by}) (herd_ready{{{sel}}}) == 0 or max by ({by}) (up{{{sel}}}) == 0",
         "for": "1m", "labels": {"severity": "critical"},
         "annotations": {"summary": "herd {{ $labels.deployment }} on {{ $labels.instance }} not ready for 1 min",
                         "description": "The serving group is loading, restarting, failed or unreachable: "
                                        "GET /health/ready on it gives the phase and the reason."}},
        {"alert": "HerdHighErrorRatio",
         "expr": (f'sum by ({by}) (rate(herd_requests_total{{{sel}, status=~"5..", route!="/metrics"}}[5m])) '
                  f'/ sum by ({by}) (rate(herd_requests_total{{{sel}, route!="/metrics"}}[5m])) > 0.05'),
         "for": "5m", "labels": {"severity": "warning"},
         "annotations": {"summary": "herd {{ $labels.deployment }}: {{ $value | humanizePercentage }} of "
                                    "requests answered 5xx on {{ $labels.instance }}",
                         "description": "503 engine_lost / not_ready, 500 request_failed: see the server's log."}},
        {"alert": "HerdRestarting",
         "expr": f"increase(herd_restarts_total{{{sel}}}[15m]) > 0",
         "labels": {"severity": "warning"},
         "annotations": {"summary": "herd {{ $labels.deployment }} restarted its engine in the last 15 min",
                         "description": "Restarts are budgeted; when spent, herd serve exits 75 and its "
                                        "service manager starts it again."}},
        {"alert": "HerdEngineMetricsMissing",
         "expr": f"herd_engine_metrics_up{{{sel}}} == 0",
         "for": "5m", "labels": {"severity": "warning"},
         "annotations": {"summary": "the engine behind herd {{ $labels.deployment }} does not answer /metrics",
                         "description": "herd's own metrics still come; vLLM's (KV cache, queue) are missing."}},
        {"alert": "HerdGpuUncorrectableEcc",
         "expr": f"herd_gpu_ecc_uncorrected_volatile_errors{{{sel}}} > 0",
         "labels": {"severity": "critical"},
         "annotations": {"summary": "GPU {{ $labels.gpu }} ({{ $labels.uuid }}) on {{ $labels.instance }}: "
                                    "{{ $value }} uncorrectable ECC errors since the driver loaded",
                         "description": "Drain the node; a GPU reset retires the pages (nvidia-smi -q -d "
                                        "PAGE_RETIREMENT,ROW_REMAPPER)."}},
        {"alert": "HerdGpuXid",
         "expr": f"increase(herd_gpu_xid_errors_total{{{sel}}}[10m]) > 0",
         "labels": {"severity": "critical"},
         "annotations": {"summary": "GPU {{ $labels.gpu }} ({{ $labels.uuid }}) on {{ $labels.instance }} "
                                    "reported a critical XID event",
                         "description": "herd_gpu_last_xid has the code (48: double-bit ECC, 79: fell off "
                                        "the bus, 94/95: contained/uncontained ECC); dmesg has the detail."}},
        {"alert": "HerdGpuLost",
         "expr": f"herd_gpu_up{{{sel}}} == 0",
         "for": "1m", "labels": {"severity": "critical"},
         "annotations": {"summary": "GPU {{ $labels.gpu }} ({{ $labels.uuid }}) on {{ $labels.instance }} "
                                    "does not answer NVML"}},
    ]
    return {"groups": [{"name": "herd", "rules": rules}]}


# ------------------------------------------------------------------ the Grafana dashboard
SEL = f'job="{JOB}", deployment=~"$deployment", instance=~"$instance"'
RATE = "$__rate_interval"


def _quantiles(metric: str, qs=(0.5, 0.95)) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le, instance) (rate({metric}_bucket{{{SEL}}}[{RATE}])))",
             f"p{int(q * 100)} {{{{instance}}}}") for q in qs]


def _panels() -> list[tuple[str, list[tuple[str, str, str, list[tuple[str, str]]]]]]:
    """(row title, [(panel title, kind, unit, [(expr, legend)])])."""
    return [
        ("Readiness", [
            ("Ready per replica", "timeseries", "none", [
                (f"max by (deployment, instance) (herd_ready{{{SEL}}})", "ready {{instance}}"),
                (f"max by (deployment, instance) (up{{{SEL}}})", "scraped {{instance}}")]),
            ("Ranks loaded per replica", "timeseries", "none", [
                (f"herd_ranks_loaded{{{SEL}}}", "loaded {{instance}}"),
                (f"herd_world_size{{{SEL}}}", "of {{instance}}")]),
            ("Phase", "state-timeline", "none", [
                (f"max by (instance, phase) (herd_phase{{{SEL}}}) == 1", "{{instance}} {{phase}}")]),
            ("Restarts (1 h)", "timeseries", "none", [
                (f"increase(herd_restarts_total{{{SEL}}}[1h])", "{{instance}}")]),
        ]),
        ("Traffic", [
            ("Requests per second by route", "timeseries", "reqps", [
                (f'sum by (instance, route) (rate(herd_requests_total{{{SEL}, route!="/metrics"}}[{RATE}]))',
                 "{{instance}} {{route}}")]),
            ("Errors per second by status", "timeseries", "reqps", [
                (f'sum by (instance, status) (rate(herd_requests_total{{{SEL}, status=~"[45].."}}[{RATE}]))',
                 "{{instance}} {{status}}")]),
            ("Error ratio", "timeseries", "percentunit", [
                (f"sum by (instance) (rate(herd_request_errors_total{{{SEL}}}[{RATE}])) / sum by (instance) "
                 f'(rate(herd_requests_total{{{SEL}, route!="/metrics"}}[{RATE}]))', "{{instance}}")]),
            ("Queue", "timeseries", "none", [
                (f"herd_queue_depth{{{SEL}}}", "in herd {{instance}}"),
                (f"sum by (instance) (vllm:num_requests_waiting{{{SEL}}})", "waiting in vLLM {{instance}}"),
                (f"sum by (instance) (vllm:num_requests_running{{{SEL}}})", "running in vLLM {{instance}}")]),
        ]),
        ("Latency", [
            ("Time to first token", "timeseries", "s", _quantiles("herd_time_to_first_token_seconds")),
            ("Time per output token", "timeseries", "s", _quantiles("herd_time_per_output_token_seconds")),
            ("Request latency", "timeseries", "s", _quantiles("herd_request_latency_seconds")),
            ("Event loop lag (p99)", "timeseries", "s", _quantiles("herd_event_loop_lag_seconds", (0.99,))),
        ]),
        ("Throughput and KV cache", [
            ("Tokens per second", "timeseries", "none", [
                (f"sum by (instance) (rate(herd_generated_tokens_total{{{SEL}}}[{RATE}]))", "generated {{instance}}"),
                (f"sum by (instance) (rate(herd_prompt_tokens_total{{{SEL}}}[{RATE}]))", "prompt {{instance}}")]),
            ("KV cache usage (vLLM)", "timeseries", "percentunit", [
                # vLLM's V1 name, and the V0 name older versions use.
                (f"max by (instance) (vllm:kv_cache_usage_perc{{{SEL}}} or vllm:gpu_cache_usage_perc{{{SEL}}})",
                 "{{instance}}")]),
            ("Preemptions per second (vLLM)", "timeseries", "none", [
                (f"sum by (instance) (rate(vllm:num_preemptions_total{{{SEL}}}[{RATE}]))", "{{instance}}")]),
            ("Time to first token inside vLLM (p95)", "timeseries", "s",
             _quantiles("vllm:time_to_first_token_seconds", (0.95,))),
        ]),
        ("GPUs", [
            ("GPU utilisation", "timeseries", "percentunit", [
                (f"herd_gpu_utilization_ratio{{{SEL}}}", "{{instance}} gpu{{gpu}}")]),
            ("GPU memory used", "timeseries", "percentunit", [
                (f"herd_gpu_memory_used_bytes{{{SEL}}} / herd_gpu_memory_total_bytes{{{SEL}}}",
                 "{{instance}} gpu{{gpu}}")]),
            ("GPU temperature", "timeseries", "celsius", [
                (f"herd_gpu_temperature_celsius{{{SEL}}}", "{{instance}} gpu{{gpu}}")]),
            ("GPU power", "timeseries", "watt", [
                (f"herd_gpu_power_watts{{{SEL}}}", "{{instance}} gpu{{gpu}}")]),
            ("GPU errors: uncorrectable ECC, XID events (1 h), last XID", "timeseries", "none", [
                (f"herd_gpu_ecc_uncorrected_volatile_errors{{{SEL}}}", "ECC {{instance}} gpu{{gpu}}"),
                (f"increase(herd_gpu_xid_errors_total{{{SEL}}}[1h])", "XIDs {{instance}} gpu{{gpu}}"),
                (f"herd_gpu_last_xid{{{SEL}}}", "last XID {{instance}} gpu{{gpu}}")]),
        ]),
    ]


def dashboard(spec: Spec) -> dict:
    panels, y, next_id = [], 0, 1
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    for row_title, row in _panels():
        panels.append({"id": next_id, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        next_id, y = next_id + 1, y + 1
        for i, (title, kind, unit, queries) in enumerate(row):
            panels.append({
                "id": next_id, "type": kind, "title": title, "datasource": datasource,
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": y + 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [{"refId": chr(ord("A") + j), "datasource": datasource, "expr": expr,
                             "legendFormat": legend} for j, (expr, legend) in enumerate(queries)]})
            next_id += 1
        y += 8 * ((len(row) + 1) // 2)
    variables = [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus",
         "current": {}, "hide": 0},
        {"name": "deployment", "type": "query", "datasource": datasource, "label": "deployment",
         "query": f'label_values(herd_ready{{job="{JOB}"}}, deployment)', "refresh": 2,
         "current": {"text": spec.name, "value": spec.name}, "includeAll": True, "allValue": ".*", "multi": True},
        {"name": "instance", "type": "query", "datasource": datasource, "label": "replica",
         "query": f'label_values(herd_ready{{job="{JOB}", deployment=~"$deployment"}}, instance)', "refresh": 2,
         "current": {"text": "All", "value": "$__all"}, "includeAll": True, "allValue": ".*", "multi": True},
    ]
    return {"uid": DASHBOARD_UID, "title": f"herd: {spec.name}", "tags": ["herd"], "timezone": "browser",
            "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
            "time": {"from": "now-3h", "to": "now"}, "templating": {"list": variables}, "panels": panels,
            "description": "herd serving: readiness, traffic, latency, tokens, vLLM KV cache, GPUs "
                           "(generated by `herd monitoring`)."}


def dashboard_queries(board: dict) -> list[str]:
    """Every PromQL expression of a dashboard's panels."""
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


# ------------------------------------------------------------------ writing it all
def _readme(spec: Spec, targets: Targets, has_key: bool) -> str:
    key = (f"\nThe deployment has an API key, and herd's /metrics needs it: put it, alone, into `{API_KEY_FILE}` "
           "next to prometheus.yml, readable by Prometheus only (`install -m 0600 -o prometheus`). The "
           "provisioning step does this from the head's own key file.\n" if has_key else "")
    fill = (f"\n`{TARGETS_FILE}` is empty: {targets.note}. Its format: "
            f'`[{{"targets": ["ADDRESS:{spec.serving.port}"], "labels": {{"deployment": "{spec.name}"}}}}]`.\n'
            if targets.file_sd else f"\nTargets: {', '.join(targets.static)} ({targets.note}).\n")
    return f"""# Monitoring for {spec.name}

Generated by `herd monitoring`. Files:

- `{CONFIG_FILE}`: Prometheus configuration (job `{JOB}`: herd's /metrics on the head of the serving group,
  which also carries the engine's `vllm:` series and the GPUs' `herd_gpu_` series).
- `{RULES_FILE}`: alert rules (not ready for 1 min, 5xx ratio, restarts, engine metrics missing, GPU ECC / XID / lost).
- `{DASHBOARD_FILE}`: Grafana dashboard (import it, pick the Prometheus data source).
{fill}{key}
Check and run:

    promtool check config {CONFIG_FILE}
    prometheus --config.file={CONFIG_FILE}

On the head node, `HERD_MONITORING=1 bash $HERD_HOME/steps/90-monitoring.sh` installs Debian's Prometheus
with these files (and the dashboard for a local Grafana, if there is one).

Not covered: worker nodes of a multi-node group serve no HTTP, so their GPUs are not scraped; XID events
are read through an NVML event set, and where a GPU refuses that (some vGPU/MIG setups) the kernel log is
the only source.
"""


def write_monitoring(spec: Spec, out: Path, scrape_interval: str = "15s", evaluation_interval: str | None = None,
                     on_head: bool = False, outputs: Path | None = None,
                     extra_targets: list[str] | None = None) -> tuple[list[Path], Targets]:
    targets = targets_for(spec, on_head, outputs, extra_targets)
    config = scrape_config(spec, targets, scrape_interval, evaluation_interval)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"# Generated by `herd monitoring` for the deployment {spec.name!r} (target {spec.target}).\n"
              f"# Targets: {targets.note}.\n")
    files = {CONFIG_FILE: header + yaml.safe_dump(config, sort_keys=False),
             RULES_FILE: header + yaml.safe_dump(alert_rules(), sort_keys=False, width=200),
             DASHBOARD_FILE: json.dumps(dashboard(spec), indent=2) + "\n",
             "README.md": _readme(spec, targets, "authorization" in config["scrape_configs"][0])}
    target_file = out / TARGETS_FILE
    if targets.file_sd and not target_file.exists():   # never overwrite addresses someone filled in
        files[TARGETS_FILE] = "[]\n"
    written = []
    for name, text in files.items():
        (out / name).write_text(text)
        written.append(out / name)
    return written, targets


# ------------------------------------------------------------------ the command
def add_monitoring(sub) -> None:
    p = sub.add_parser("monitoring", help="write a Prometheus scrape config, alert rules and a Grafana dashboard")
    p.add_argument("environment", help="environments/NAME.yaml")
    p.add_argument("--out", required=True, help="directory to write into (created if missing)")
    p.add_argument("--scrape-interval", default="15s", help="Prometheus duration (default 15s)")
    p.add_argument("--evaluation-interval", help="rule evaluation interval (default: the scrape interval)")
    p.add_argument("--on-head", action="store_true",
                   help="Prometheus runs on the head node itself: scrape its loopback endpoint")
    p.add_argument("--outputs", type=Path, help="cloud targets: the stack's outputs (`herd status ENV --json`)")
    p.add_argument("--target", action="append", default=[], metavar="HOST:PORT",
                   help="another herd endpoint to scrape (another replica); repeatable")
    p.set_defaults(func=cmd_monitoring)


def cmd_monitoring(args) -> int:
    from rich.console import Console
    spec = load_spec(args.environment)
    written, targets = write_monitoring(spec, Path(args.out), args.scrape_interval, args.evaluation_interval,
                                        args.on_head, args.outputs, args.target)
    console = Console(highlight=False, soft_wrap=True)
    for path in written:
        console.print(f"wrote {path}", markup=False)
    where = ", ".join(targets.static) if targets.static else f"none yet: fill {Path(args.out) / TARGETS_FILE}"
    console.print(f"targets: {where} ({targets.note})", markup=False)
    return 0
