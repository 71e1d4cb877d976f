"""Load balancer benchmark: two `herd serve` replicas (TP 1, the tiny test model, so that the proxy's
own cost is not hidden under generation time) behind a real HAProxy (TLS, leastconn, /health/ready
checks: the configuration provisioning/haproxy.py renders, installed by the 90-haproxy step), on loopback.

Cases, interleaved round by round (these machines are noisy: compare within a round), each replica
with one thread (two replicas on two cores):
  direct         4 clients straight to replica 0 (plain HTTP, keep-alive)
  haproxy-1      4 clients through HAProxy over TLS with replica 1 in maintenance: the proxy's overhead
  haproxy-2      4 clients through HAProxy over TLS to both replicas (on 2 cores they share the CPUs)
For each: requests/s and p50/p99 latency; the overhead ratio is haproxy-1 against direct. Also one client's
sequential GET /health/live straight and through HAProxy: the proxy's (and TLS record) cost per request.
Then a kill: the same 4 clients through HAProxy while replica 1's rank is killed (kill -9): failed
requests, how long until HAProxy took it out of rotation, and until it was back.

Usage: python bench/balancer.py [--rounds 5] [--requests 30] [--out bench/results/balancer-MACHINE.txt]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import Report  # noqa: E402

CLIENTS = 4
BODY = {"model": "tiny", "prompt": "Hello world", "max_tokens": 8, "temperature": 0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_clients(url: str, verify, per_client: int) -> dict:
    """CLIENTS threads, each `per_client` requests on its own keep-alive connection."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client():
        with httpx.Client(verify=verify, timeout=60) as http:
            http.post(f"{url}/v1/completions", json=BODY)          # connect (and TLS) outside the clock
            for _ in range(per_client):
                started = time.perf_counter()
                try:
                    r = http.post(f"{url}/v1/completions", json=BODY)
                    ok = r.status_code == 200
                    detail = f"{r.status_code}"
                except httpx.HTTPError as err:
                    ok, detail = False, type(err).__name__
                with lock:
                    if ok:
                        latencies.append(time.perf_counter() - started)
                    else:
                        failures.append(detail)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {"requests": len(latencies) + len(failures), "failed": len(failures),
            "rps": round(len(latencies) / wall, 2), "p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
            "p99_ms": round(percentile(latencies, 0.99) * 1000, 1), "latencies": latencies}


def probe(url: str, verify, count: int = 50) -> list[float]:
    """One client, sequential GET /health/live (no generation): the front's and the proxy's own cost."""
    out = []
    with httpx.Client(verify=verify, timeout=30) as http:
        http.get(f"{url}/health/live")
        for _ in range(count):
            started = time.perf_counter()
            assert http.get(f"{url}/health/live").status_code == 200
            out.append(time.perf_counter() - started)
    return out


def kill_under_load(lb, servers, verify) -> dict:
    from tests.provisioning.test_haproxy import Load, wait_states
    load = Load(lb.url, Path(verify), threads=CLIENTS, streams=1, limit=120)
    started = time.monotonic()
    while load.served_by() != {"replica-0", "replica-1"} and time.monotonic() - started < 30:
        time.sleep(0.2)
    time.sleep(2)
    os.kill(servers[1].rank_pid(0), signal.SIGKILL)
    killed_at = time.monotonic()
    down = wait_states(lb, {"replica-1": "DOWN"}, within=15)
    up = wait_states(lb, {"replica-1": "UP"}, within=180)
    time.sleep(3)
    outcomes = load.stop()
    failed = [o for o in outcomes if not o.ok]
    in_flight = [o for o in failed if o.started <= killed_at <= o.ended]
    after_detection = [o for o in failed if o.started >= killed_at + down]
    return {"case": "kill -9 of replica 1's rank under load", "requests": len(outcomes),
            "streamed": sum(o.stream for o in outcomes), "failed": len(failed),
            "failed_in_flight_at_kill": len(in_flight), "failed_after_detection": len(after_detection),
            "failures": [f"{o.replica} {'stream' if o.stream else 'plain'}: {o.detail[-80:]}" for o in failed],
            "down_after_s": round(down, 2), "up_again_after_s": round(up, 1)}


def versions() -> dict:
    import torch
    haproxy = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.splitlines()[0]
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    return {"git": sha + ("+dirty" if dirty else ""), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": importlib.metadata.version("transformers"), "httpx": httpx.__version__, "haproxy": haproxy}


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=30, help="requests per client per case per round")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from provisioning.haproxy import Replica, set_state
    from tests.provisioning.test_haproxy import make_certs, run_step, start_balancer, wait_states
    from tests.runtime.conftest import ServeProcess, free_port, make_tiny_model, stop_and_check

    report = Report({"bench": "balancer", "machine": f"{platform.node()} ({os.cpu_count()} cores, "
                     f"{platform.machine()}, CPU)", **versions(), "model": "tiny random Llama (tests), TP 1, fp32, 1 thread per replica",
                     "clients": CLIENTS, "max_tokens": BODY["max_tokens"], "rounds": args.rounds,
                     "requests_per_client": args.requests})
    with tempfile.TemporaryDirectory(prefix="herd-bench-lb-") as tmp:
        tmp = Path(tmp)
        model = make_tiny_model(tmp / "model")
        # One thread per replica: two replicas on two cores, each on its own (more threads than cores
        # make torch's OpenMP workers spin against each other: seconds per request).
        env_file = tmp / "tiny.yaml"
        env_file.write_text(f"name: tiny\ntarget: local\nmodel: {{id: 'config:{model}/config.json', dtype: float32}}\n"
                            "context: {max_model_len: 512}\nlocal: {threads_per_rank: 1}\n")
        servers = []
        for i in range(2):
            (tmp / f"replica-{i}").mkdir()
            servers.append(ServeProcess([str(env_file), "--model-dir", str(model), "--tp", "1",
                                         "--served-model-name", "tiny", "--max-model-len", "512", "--concurrency",
                                         "4", "--max-restarts", "10"], tmp / f"replica-{i}").start())
        certs = make_certs(tmp)
        lb = start_balancer(tmp / "lb", [Replica(f"replica-{i}", "127.0.0.1", s.port) for i, s in enumerate(servers)],
                            certs, free_port())
        try:
            for server in servers:
                server.wait_ready(300)
            done = run_step(lb.env)
            assert done.returncode == 0, done.stdout + done.stderr
            wait_states(lb, {"replica-0": "UP", "replica-1": "UP"}, within=30)
            tls = ssl.create_default_context(cafile=str(certs.ca))
            cases = {"direct": (servers[0].url, True, None), "haproxy-1": (lb.url, tls, "maint"),
                     "haproxy-2": (lb.url, tls, "ready")}
            pooled: dict[str, list[float]] = {case: [] for case in cases}
            probes: dict[str, list[float]] = {"direct": [], "haproxy-1": []}
            best: dict[str, float] = {case: 0.0 for case in cases}
            run_clients(servers[0].url, True, 3)                                  # warm up
            for round_no in range(args.rounds):
                order = list(cases) if round_no % 2 == 0 else list(reversed(cases))
                row: dict[str, object] = {"round": round_no + 1}
                for case in order:
                    url, verify, replica1 = cases[case]
                    if replica1:
                        set_state(lb.socket, "replica-1", replica1)
                        time.sleep(0.5)
                    if case in probes:
                        probes[case] += probe(url, verify)
                    result = run_clients(url, verify, args.requests)
                    pooled[case] += result.pop("latencies")
                    best[case] = max(best[case], result["rps"])
                    row[case] = result
                set_state(lb.socket, "replica-1", "ready")
                report.emit(row)
            summary = {case: {"best_rps": best[case], "p50_ms": round(percentile(pooled[case], 0.5) * 1000, 1),
                              "p99_ms": round(percentile(pooled[case], 0.99) * 1000, 1), "requests": len(pooled[case])}
                       for case in cases}
            for case, values in probes.items():
                summary[f"{case} GET /health/live, 1 client"] = {
                    "p50_ms": round(percentile(values, 0.5) * 1000, 2), "p99_ms": round(percentile(values, 0.99) * 1000, 2),
                    "requests": len(values)}
            summary["overhead"] = {
                "health_live_p50_added_ms": round((percentile(probes["haproxy-1"], 0.5)
                                                   - percentile(probes["direct"], 0.5)) * 1000, 2),
                "haproxy_tls_vs_direct_rps": round(best["haproxy-1"] / best["direct"], 3),
                "haproxy_tls_vs_direct_p50": round(summary["haproxy-1"]["p50_ms"] / summary["direct"]["p50_ms"], 3),
                "haproxy_tls_vs_direct_p99": round(summary["haproxy-1"]["p99_ms"] / summary["direct"]["p99_ms"], 3),
                "two_replicas_vs_direct_rps": round(best["haproxy-2"] / best["direct"], 3)}
            report.emit({"summary": summary})
            wait_states(lb, {"replica-0": "UP", "replica-1": "UP"}, within=60)
            report.emit(kill_under_load(lb, servers, str(certs.ca)))
        finally:
            lb.stop()
            for server in servers:
                stop_and_check(server)
    report.save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
