"""Node-side commands: plan, serve, smoke. Upper layers add theirs (see provisioning.cli, infra.cli)."""
from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console

from runtime.arg_types import auto_or_int, positive_int  # noqa: F401 - the parsers below use them
from runtime.errors import EXIT_USER_ERROR, UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (exit 2 either way)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        sys.stderr.write(f"herd: error: {self.prog}: {message} (see --help)\n")
        raise SystemExit(EXIT_USER_ERROR)


# ------------------------------------------------------------------ plan
def add_plan(sub) -> None:
    p = sub.add_parser("plan", help="check that a deployment fits before spending money")
    p.add_argument("environment", nargs="?", help="environments/NAME.yaml")
    p.add_argument("--model", help="catalog id, or a path to any model's config.json")
    p.add_argument("--instance", help="cloud instance / machine type (e.g. p5.48xlarge)")
    p.add_argument("--accelerator", help="on-prem shape: accelerator id (with --gpus)")
    p.add_argument("--gpus", type=positive_int, help="on-prem shape: devices per node")
    p.add_argument("--quantization", default="none", choices=["none", "fp8", "int8", "int4"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--nodes", type=auto_or_int, default="auto")
    p.add_argument("--tensor", type=auto_or_int, default="auto")
    p.add_argument("--pipeline", type=auto_or_int, default="auto")
    p.add_argument("--context", type=positive_int, default=8192, help="max_model_len")
    p.add_argument("--concurrency", type=positive_int, default=8)
    p.add_argument("--max-prefill-tokens", type=positive_int, default=None,
                   help="largest prompt batch prefilled at once, in tokens (default 8192)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--svg", metavar="FILE", help="also draw per-device memory (this configuration and the "
                                                "suggestions side by side) into an SVG file")
    p.set_defaults(func=cmd_plan)


def request_from_flags(args):
    from pathlib import Path

    from runtime.planning import catalog
    from runtime.planning.architecture import Architecture
    from runtime.planning.planner import Hardware, PlanRequest

    if not args.model:
        raise UserError("plan: --model is required without an environment file")
    if args.model.endswith(".json") or Path(args.model).is_dir():
        path = Path(args.model)
        arch = Architecture.from_config_json(path / "config.json" if path.is_dir() else path)
        model_id, fp8 = str(path), None
    else:
        model = catalog.model(args.model, "--model")
        arch, model_id, fp8 = model.architecture, model.id, model.fp8_checkpoint
    if args.instance:
        hw = Hardware.from_instance(args.instance, "--instance",
                                    max_nodes=args.nodes if args.nodes != "auto" else 4)
    elif args.accelerator and args.gpus:
        hw = Hardware(accelerator=catalog.accelerator(args.accelerator, "--accelerator"),
                      devices_per_node=args.gpus, max_nodes=args.nodes if args.nodes != "auto" else 4)
    else:
        raise UserError("plan: give --instance I, or --accelerator A with --gpus G")
    if args.context > arch.max_position_embeddings:
        raise UserError(f"--context: {args.context} is above the model's maximum "
                        f"(allowed: 16..{arch.max_position_embeddings})")
    if args.tensor != "auto" and not arch.valid_tensor_parallel(args.tensor):
        raise UserError(f"--tensor: {args.tensor} does not divide {arch.num_attention_heads} attention / "
                        f"{arch.num_key_value_heads} KV heads (allowed: auto, "
                        f"{', '.join(map(str, arch.tensor_parallel_choices(64)))})")
    return PlanRequest(architecture=arch, hardware=hw, model_id=model_id, dtype=args.dtype,
                       quantization=args.quantization, max_model_len=args.context,
                       concurrency=args.concurrency, max_prefill_tokens=args.max_prefill_tokens or 8192,
                       tensor=args.tensor, pipeline=args.pipeline, nodes=args.nodes, fp8_checkpoint=fp8,
                       # TPU slices serve with vLLM's TPU backend only.
                       engine="vllm" if hw.accelerator.is_tpu else "transformers")


def cmd_plan(args) -> int:
    from runtime.planning.plan_report import render, write_svg
    from runtime.planning.plan_spec import request_from_spec
    from runtime.planning.planner import plan
    from runtime.planning.spec import load_spec

    if args.environment:
        req = request_from_spec(load_spec(args.environment))
    else:
        req = request_from_flags(args)
    result = plan(req)
    if args.svg:
        try:
            write_svg(args.svg, result, req)
        except OSError as err:
            raise UserError(f"--svg: {args.svg!r}: {err.strerror}") from None
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        render(result, Console(), req)
        if args.svg:
            Console(highlight=False).print(f"wrote {args.svg}", markup=False)
    return 0 if result.fits else 1


# ------------------------------------------------------------------ entry
def build_parser(registrars) -> ArgumentParser:
    parser = ArgumentParser(prog="herd", description="Stand up Llama-class inference: plan, provision, serve, smoke.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for register in registrars:
        register(sub)
    return parser


def _add_serve(sub) -> None:
    from runtime.serving.serve import add_serve
    add_serve(sub)


def _add_smoke(sub) -> None:
    from runtime.serving.smoke import add_smoke
    add_smoke(sub)


def _add_generate(sub) -> None:
    from runtime.serving.batch import add_generate
    add_generate(sub)


def _add_monitoring(sub) -> None:
    from runtime.serving.monitoring import add_monitoring
    add_monitoring(sub)


RUNTIME_COMMANDS = [add_plan, _add_serve, _add_smoke, _add_generate, _add_monitoring]


def run(argv, registrars) -> int:
    args = build_parser(registrars).parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as err:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"herd: error: {err}", markup=False)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130


def main(argv=None) -> int:
    return run(argv, RUNTIME_COMMANDS)
