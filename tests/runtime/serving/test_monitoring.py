"""`herd monitoring`: the scrape configuration, alert rules and dashboard it writes, checked by the real
Prometheus (Debian's `prometheus` package: the server and promtool) against live herd servers.

Two replicas are scraped: herd's own engine on the tiny model, and herd's front before the fake
vLLM engine of test_metrics_proxy (so the dashboard's vLLM queries have vLLM-named series to find).
Both use an API key, as every non-loopback deployment does, so the scrape's authorization is real.
GPU queries can only parse and come back empty here (no GPU on this host).
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from runtime.serving.monitoring import DASHBOARD_FILE, RULES_FILE, dashboard_queries
from tests.conftest import ROOT, run_herd, wait_for
from tests.runtime.conftest import free_port

KEY = "monitoring-test-key-0123456789"
STEP = ROOT / "provisioning" / "steps" / "90-monitoring.sh"

needs_prometheus = pytest.mark.skipif(not (shutil.which("prometheus") and shutil.which("promtool")),
                                      reason="Debian's prometheus package (make system installs it)")


def env_file(tmp_path, port: int, name: str = "mon-test", **serving) -> str:
    """A local environment for the tiny model, serving where the live server listens."""
    spec = {"name": name, "target": "local",
            "model": {"id": f"config:{tmp_path / 'tiny-config.json'}", "dtype": "float32"},
            "context": {"max_model_len": 512, "concurrency": 2},
            "serving": {"port": port, "api_key_env": "HERD_MON_KEY", **serving}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def generate(tmp_path, tiny_model, port: int, *extra: str):
    shutil.copy(tiny_model / "config.json", tmp_path / "tiny-config.json")
    out = tmp_path / "monitoring"
    done = run_herd("monitoring", env_file(tmp_path, port), "--out", str(out), *extra)
    assert done.returncode == 0, done.stderr
    return out


# ------------------------------------------------------------------ what it writes (no servers)
def test_targets_come_from_the_environment(tmp_path, tiny_model):
    out = generate(tmp_path, tiny_model, 8123, "--scrape-interval", "5s")
    config = yaml.safe_load((out / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8123"]
    assert job["static_configs"][0]["labels"]["deployment"] == "mon-test"
    assert job["authorization"] == {"type": "Bearer", "credentials_file": "herd-api-key"}
    assert job["scrape_interval"] == "5s" and job["scrape_timeout"] == "5s"
    assert config["rule_files"] == [RULES_FILE]
    assert KEY not in "".join(p.read_text() for p in out.iterdir())   # the key is never written

    # On-prem: the head (the first host) serves /metrics; workers serve no HTTP.
    onprem = tmp_path / "onprem"
    done = run_herd("monitoring", str(ROOT / "environments" / "onprem-example.yaml"), "--out", str(onprem))
    assert done.returncode == 0, done.stderr
    job = yaml.safe_load((onprem / "prometheus.yml").read_text())["scrape_configs"][0]
    assert job["static_configs"][0]["targets"] == ["10.0.0.11:8000"]
    assert job["static_configs"][0]["labels"]["engine"] == "vllm"

    # A cloud stack: addresses unknown until it is up (file_sd to fill), or from its outputs.
    aws_env = str(ROOT / "environments" / "aws-p5-405b-fp8.yaml")
    cloud = tmp_path / "cloud"
    done = run_herd("monitoring", aws_env, "--out", str(cloud))
    assert done.returncode == 0, done.stderr
    job = yaml.safe_load((cloud / "prometheus.yml").read_text())["scrape_configs"][0]
    assert job["file_sd_configs"][0]["files"] == ["herd-targets.json"] and "static_configs" not in job
    assert json.loads((cloud / "herd-targets.json").read_text()) == []
    assert "herd-targets.json" in done.stdout
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps({"endpoint": "http://203.0.113.7:8000", "head_address": "203.0.113.7",
                                   "node_addresses": ["203.0.113.7"]}))
    done = run_herd("monitoring", aws_env, "--out", str(tmp_path / "cloud2"), "--outputs", str(outputs))
    assert done.returncode == 0, done.stderr
    job = yaml.safe_load((tmp_path / "cloud2" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert job["static_configs"][0]["targets"] == ["203.0.113.7:8000"]

    bad = run_herd("monitoring", aws_env, "--out", str(tmp_path / "x"), "--scrape-interval", "soon")
    assert bad.returncode == 2 and "--scrape-interval: 'soon'" in bad.stderr


# ------------------------------------------------------------------ the alert rules, by promtool
ALERT_TESTS = """
rule_files: [{rules}]
evaluation_interval: 15s
tests:
  - interval: 15s
    input_series:
      # a: ready, then not ready from 30 s on. b: scraped, then unreachable from 15 s on (no herd_ready).
      - series: 'herd_ready{{job="herd", deployment="d", instance="a:1"}}'
        values: '1 1 0x20'
      - series: 'up{{job="herd", deployment="d", instance="a:1"}}'
        values: '1x22'
      - series: 'up{{job="herd", deployment="d", instance="b:1"}}'
        values: '1 0x21'
    alert_rule_test:
      - eval_time: 45s          # not ready for 15-30 s: pending, not firing
        alertname: HerdNotReady
        exp_alerts: []
      - eval_time: 2m
        alertname: HerdNotReady
        exp_alerts:
          - exp_labels: {{severity: critical, deployment: d, instance: "a:1"}}
            exp_annotations: &nr_a
              summary: herd d on a:1 not ready for 1 min
              description: "The serving group is loading, restarting, failed or unreachable: GET /health/ready on it gives the phase and the reason."
          - exp_labels: {{severity: critical, deployment: d, instance: "b:1"}}
            exp_annotations:
              summary: herd d on b:1 not ready for 1 min
              description: "The serving group is loading, restarting, failed or unreachable: GET /health/ready on it gives the phase and the reason."
  - interval: 1m
    input_series:
      # a answers 1 request in 11 with a 5xx; c 1 in 1001 (healthy); scrapes of /metrics do not count.
      - series: 'herd_requests_total{{job="herd", deployment="d", instance="a:1", route="/v1/completions", status="200"}}'
        values: '0+10x20'
      - series: 'herd_requests_total{{job="herd", deployment="d", instance="a:1", route="/v1/completions", status="503"}}'
        values: '0+1x20'
      - series: 'herd_requests_total{{job="herd", deployment="d", instance="c:1", route="/v1/completions", status="200"}}'
        values: '0+1000x20'
      - series: 'herd_requests_total{{job="herd", deployment="d", instance="c:1", route="/v1/completions", status="500"}}'
        values: '0+1x20'
      - series: 'herd_requests_total{{job="herd", deployment="d", instance="c:1", route="/metrics", status="200"}}'
        values: '0+0x20'
      - series: 'herd_restarts_total{{job="herd", deployment="d", instance="a:1"}}'
        values: '0 0 1 1x17'
      - series: 'herd_engine_metrics_up{{job="herd", deployment="d", instance="a:1"}}'
        values: '1 0x19'
      - series: 'herd_gpu_ecc_uncorrected_volatile_errors{{job="herd", deployment="d", instance="a:1", gpu="3", uuid="GPU-3"}}'
        values: '0 0 2x18'
      - series: 'herd_gpu_xid_errors_total{{job="herd", deployment="d", instance="a:1", gpu="5", uuid="GPU-5"}}'
        values: '0 0 1x18'
      - series: 'herd_gpu_up{{job="herd", deployment="d", instance="a:1", gpu="5", uuid="GPU-5"}}'
        values: '1 1 1 0x17'
    alert_rule_test:
      - eval_time: 10m
        alertname: HerdHighErrorRatio
        exp_alerts:
          - exp_labels: {{severity: warning, deployment: d, instance: "a:1"}}
            exp_annotations:
              summary: "herd d: 9.091% of requests answered 5xx on a:1"
              description: "503 engine_lost / not_ready, 500 request_failed: see the server's log."
      - eval_time: 5m
        alertname: HerdRestarting
        exp_alerts:
          - exp_labels: {{severity: warning, job: herd, deployment: d, instance: "a:1"}}
            exp_annotations:
              summary: herd d restarted its engine in the last 15 min
              description: "Restarts are budgeted; when spent, herd serve exits 75 and its service manager starts it again."
      - eval_time: 19m          # 15 min after the restart: quiet again
        alertname: HerdRestarting
        exp_alerts: []
      - eval_time: 7m
        alertname: HerdEngineMetricsMissing
        exp_alerts:
          - exp_labels: {{severity: warning, job: herd, deployment: d, instance: "a:1"}}
            exp_annotations:
              summary: the engine behind herd d does not answer /metrics
              description: "herd's own metrics still come; vLLM's (KV cache, queue) are missing."
      - eval_time: 3m
        alertname: HerdGpuUncorrectableEcc
        exp_alerts:
          - exp_labels: {{severity: critical, job: herd, deployment: d, instance: "a:1", gpu: "3", uuid: GPU-3}}
            exp_annotations:
              summary: "GPU 3 (GPU-3) on a:1: 2 uncorrectable ECC errors since the driver loaded"
              description: "Drain the node; a GPU reset retires the pages (nvidia-smi -q -d PAGE_RETIREMENT,ROW_REMAPPER)."
      - eval_time: 3m
        alertname: HerdGpuXid
        exp_alerts:
          - exp_labels: {{severity: critical, job: herd, deployment: d, instance: "a:1", gpu: "5", uuid: GPU-5}}
            exp_annotations:
              summary: "GPU 5 (GPU-5) on a:1 reported a critical XID event"
              description: "herd_gpu_last_xid has the code (48: double-bit ECC, 79: fell off the bus, 94/95: contained/uncontained ECC); dmesg has the detail."
      - eval_time: 15m          # the event is older than the 10 min window
        alertname: HerdGpuXid
        exp_alerts: []
      - eval_time: 5m
        alertname: HerdGpuLost
        exp_alerts:
          - exp_labels: {{severity: critical, job: herd, deployment: d, instance: "a:1", gpu: "5", uuid: GPU-5}}
            exp_annotations:
              summary: "GPU 5 (GPU-5) on a:1 does not answer NVML"
"""


@needs_prometheus
def test_promtool_accepts_the_rules_and_each_alert_fires_on_its_condition(tmp_path, tiny_model):
    out = generate(tmp_path, tiny_model, 8123)
    rules = out / RULES_FILE
    check = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0 and "SUCCESS: 7 rules found" in check.stdout, check.stdout + check.stderr
    names = {r["alert"] for g in yaml.safe_load(rules.read_text())["groups"] for r in g["rules"]}
    tests = tmp_path / "alert-tests.yml"
    tests.write_text(ALERT_TESTS.format(rules=rules))
    assert names == set(re.findall(r"alertname: (\w+)", tests.read_text()))   # every alert is exercised
    done = subprocess.run(["promtool", "test", "rules", str(tests)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------------ real Prometheus, live servers
def query(prom: str, expr: str) -> list:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def grafana_substitute(expr: str) -> str:
    """What Grafana sends for the dashboard's variables with "All" selected."""
    return (expr.replace("$__rate_interval", "1m").replace('"$deployment"', '"mon-test"')
            .replace('"$instance"', '".*"'))


def needs(expr: str) -> str:
    return "gpu" if "herd_gpu_" in expr else "vllm" if "vllm:" in expr else "herd"


@pytest.fixture
def prometheus(tmp_path):
    """Start the real Prometheus server on a free port; stopped afterwards."""
    procs = []

    def start(config) -> str:
        port = free_port()
        log = open(tmp_path / "prometheus.log", "wb")
        proc = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=log, stderr=subprocess.STDOUT)
        procs.append((proc, log))
        url = f"http://127.0.0.1:{port}"

        def ready():
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            try:
                return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False
        wait_for("prometheus ready", ready, timeout=30, every=0.2)
        return url
    yield start
    for proc, log in procs:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@needs_prometheus
@pytest.mark.slow
@pytest.mark.timeout(360)   # two servers and a real Prometheus: ~70 s here
def test_prometheus_scrapes_herd_and_every_dashboard_query_and_alert_works(tmp_path, tiny_model, serve, prometheus):
    env = {"HERD_MON_KEY": KEY}
    herd = serve("--model-dir", str(tiny_model), "--served-model-name", "tiny", "--api-key-env", "HERD_MON_KEY",
                 "--canary-interval", "2", env=env, name="herd-engine")
    engine_port = free_port()
    fake = [sys.executable, "-m", "tests.runtime.serving.test_metrics_proxy", "--port", str(engine_port),
            "--starts", str(tmp_path / "starts")]
    vllm = serve("--engine-cmd", shlex.join(fake), "--engine-url", f"http://127.0.0.1:{engine_port}",
                 "--served-model-name", "tiny", "--api-key-env", "HERD_MON_KEY", env=env, name="vllm-front")
    out = generate(tmp_path, tiny_model, herd.port, "--scrape-interval", "1s",
                   "--target", f"127.0.0.1:{vllm.port}")
    (out / "herd-api-key").write_text(KEY)   # as the README says; the provisioning step copies the head's
    (out / "herd-api-key").chmod(0o600)
    check = subprocess.run(["promtool", "check", "config", str(out / "prometheus.yml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    herd.wait_ready(timeout=180)
    vllm.wait_ready(timeout=60)
    prom = prometheus(out / "prometheus.yml")

    # Traffic on both replicas: streamed and not, chat, and a few refused requests (errors).
    auth = {"Authorization": f"Bearer {KEY}"}
    for server in (herd, vllm):
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0}
        for stream in (False, True, False, True):
            r = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": stream}, headers=auth, timeout=60)
            assert r.status_code == 200, r.text
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        assert httpx.post(f"{server.url}/v1/chat/completions", json=chat, headers=auth, timeout=60).status_code == 200
        assert httpx.post(f"{server.url}/v1/completions", json={**body, "model": "nope"}, headers=auth,
                          timeout=30).status_code == 404
    instances = {f"127.0.0.1:{herd.port}", f"127.0.0.1:{vllm.port}"}

    # Both targets scraped with the key, and the traffic is in Prometheus.
    def scraped():
        up = {s["metric"]["instance"]: s["value"][1] for s in query(prom, 'up{job="herd"}')}
        tokens = query(prom, 'herd_generated_tokens_total{job="herd"} > 0')
        return up == {i: "1" for i in instances} and len(tokens) == 2
    wait_for("both replicas scraped after the traffic", scraped)

    board = json.loads((out / DASHBOARD_FILE).read_text())
    exprs = dashboard_queries(board)
    assert {needs(e) for e in exprs} == {"herd", "vllm", "gpu"} and len(exprs) >= 25
    for expr in exprs:
        promql = grafana_substitute(expr)
        if needs(expr) == "gpu":
            assert query(prom, promql) == [], promql   # parses; no GPU on this host
            continue
        # herd's own series from both replicas; vLLM's from the replica whose engine has them.
        expected = instances if needs(expr) == "herd" else {f"127.0.0.1:{vllm.port}"}
        found = wait_for(promql, lambda: {s["metric"].get("instance") for s in query(prom, promql)} >= expected
                         and query(prom, promql), timeout=30)
        assert found, promql

    # The dashboard's variables resolve through the same label queries Grafana would run.
    for var in board["templating"]["list"]:
        if var["type"] != "query":
            continue
        selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"]).groups()
        selector = selector.replace('"$deployment"', '"mon-test"')
        r = httpx.get(f"{prom}/api/v1/series", params={"match[]": selector}).json()
        assert r["status"] == "success"
        values = {s[label] for s in r["data"]}
        assert values == ({"mon-test"} if label == "deployment" else instances), (var["name"], values)

    # Every rule loaded and evaluated without error; every alert expression is a valid query.
    def evaluated():
        groups = httpx.get(f"{prom}/api/v1/rules").json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if len(rules) == 7 and all(r["lastEvaluation"] > "2000" for r in rules) else None
    for rule in wait_for("rules evaluated", evaluated, timeout=20):
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
        query(prom, rule["query"])
    alerts = httpx.get(f"{prom}/api/v1/alerts").json()["data"]["alerts"]
    assert not [a for a in alerts if a["labels"]["alertname"] == "HerdNotReady"], alerts

    # herd's own engine goes away: HerdNotReady for that replica (pending: it fires after 1 min).
    herd.stop()

    def not_ready_alert():
        return [a for a in httpx.get(f"{prom}/api/v1/alerts").json()["data"]["alerts"]
                if a["labels"]["alertname"] == "HerdNotReady"]
    alerting = wait_for("HerdNotReady after the server stopped", not_ready_alert, timeout=20)
    assert [a["labels"]["instance"] for a in alerting] == [f"127.0.0.1:{herd.port}"]
    assert alerting[0]["state"] in ("pending", "firing") and alerting[0]["labels"]["deployment"] == "mon-test"


# ------------------------------------------------------------------ the optional provisioning step
def run_step(tmp_path, env: dict, dry_run: bool = False):
    full = {**os.environ, "HERD_HOME": str(tmp_path / "home"), "HERD_SYSTEMD": "0", **env}
    return subprocess.run(["bash", str(STEP)] + (["--dry-run"] if dry_run else []), env=full,
                          capture_output=True, text=True, timeout=60)


def test_the_step_is_off_unless_asked_and_skips_worker_nodes(tmp_path):
    off = run_step(tmp_path, {})
    assert off.returncode == 0 and "skip: monitoring not requested" in off.stdout
    worker = run_step(tmp_path, {"HERD_MONITORING": "1",
                                 "HERD_SERVE_ARGS": "/opt/herd/env.yaml --nnodes 2 --role worker"})
    assert worker.returncode == 0 and "skip: a worker node" in worker.stdout
    assert not (tmp_path / "home").exists()


@needs_prometheus
def test_the_step_installs_checked_files_and_refuses_broken_ones(tmp_path, tiny_model):
    out = generate(tmp_path, tiny_model, 8123)
    home = tmp_path / "home"
    (home / "secrets").mkdir(parents=True)
    (home / "secrets" / "api-key").write_text(KEY)
    conf = tmp_path / "etc-prometheus"
    conf.mkdir()
    (conf / "prometheus.yml").write_text("global: {}\n")   # the package's own
    env = {"HERD_MONITORING": "1", "HERD_MONITORING_DIR": str(out), "HERD_PROMETHEUS_DIR": str(conf)}

    dry = run_step(tmp_path, env, dry_run=True)
    assert dry.returncode == 0, dry.stderr
    assert f"would run: install -m 0644 {out}/prometheus.yml {conf}/prometheus.yml" in dry.stdout
    assert (conf / "prometheus.yml").read_text() == "global: {}\n"       # a dry run changes nothing

    done = run_step(tmp_path, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "skip: no systemd on this host: configuration installed" in done.stdout
    assert (conf / "prometheus.yml").read_text() == (out / "prometheus.yml").read_text()
    assert (conf / "prometheus.yml.before-herd").read_text() == "global: {}\n"
    assert (conf / "herd-api-key").read_text() == KEY and (conf / "herd-api-key").stat().st_mode & 0o777 == 0o600
    check = subprocess.run(["promtool", "check", "config", str(conf / "prometheus.yml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    # A broken rule file is refused before anything is replaced.
    installed = (conf / "herd-rules.yml").read_text()
    (out / "herd-rules.yml").write_text(installed.replace("== 0", "=== 0", 1))
    refused = run_step(tmp_path, env)
    assert refused.returncode == 1 and "promtool refuses" in refused.stderr
    assert (conf / "herd-rules.yml").read_text() == installed


@needs_prometheus
def test_the_step_generates_the_files_on_the_head_from_herd_serves_environment(tmp_path, tiny_model):
    home = tmp_path / "home"
    (home / "venv" / "bin").mkdir(parents=True)
    herd_script = home / "venv" / "bin" / "herd"
    # The head's herd, as the venv step installs it: this checkout's, run by this interpreter.
    herd_script.write_text(f"#!/bin/sh\ncd {shlex.quote(str(ROOT))} && exec {shlex.quote(sys.executable)} "
                           '-m infra.cli "$@"\n')
    herd_script.chmod(0o755)
    shutil.copy(tiny_model / "config.json", tmp_path / "tiny-config.json")
    env_path = env_file(tmp_path, 8124, name="on head", host="0.0.0.0")   # a space: quoting matters
    (home / "secrets").mkdir()
    (home / "secrets" / "api-key").write_text(KEY)
    conf = tmp_path / "etc-prometheus"
    serve_args = shlex.join([env_path, "--model-dir", "/opt/herd/models/m", "--api-key-file",
                             f"{home}/secrets/api-key"])
    done = run_step(tmp_path, {"HERD_MONITORING": "1", "HERD_PROMETHEUS_DIR": str(conf),
                               "HERD_SERVE_ARGS": serve_args})
    assert done.returncode == 0, done.stdout + done.stderr
    job = yaml.safe_load((conf / "prometheus.yml").read_text())["scrape_configs"][0]
    # Prometheus on the head scrapes the head's loopback (serving on 0.0.0.0 answers there too).
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8124"]
    assert job["static_configs"][0]["labels"]["deployment"] == "on head"
    assert (home / "monitoring" / "grafana-dashboard.json").is_file()
    assert (conf / "herd-api-key").read_text() == KEY
