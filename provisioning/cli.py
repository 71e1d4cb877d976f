"""Provisioning commands: up / down / status for local and on-prem; the clouds plug in from infra."""
from __future__ import annotations

from rich.console import Console

from runtime.cli import RUNTIME_COMMANDS
from runtime.errors import UserError
from runtime.planning.spec import load_spec


# Targets a higher layer serves (infra registers aws and gcp): target -> {action: handler}. The
# registry keeps imports one-way: provisioning never imports infra. Every handler takes
# (spec, environment path, console, ...), as up_local and up_onprem do.
TARGET_HANDLERS: dict[str, dict] = {}


def register_target(target: str, up, down, status) -> None:
    TARGET_HANDLERS[target] = {"up": up, "down": down, "status": status}


def _target_handler(spec, action: str):
    if spec.target in TARGET_HANDLERS:
        return TARGET_HANDLERS[spec.target][action]
    if spec.target == "local":
        from provisioning import local
        return getattr(local, f"{action}_local")
    if spec.target == "onprem":
        from provisioning import onprem
        return getattr(onprem, f"{action}_onprem")
    raise UserError(f"target: {spec.target!r}: `herd {action}` supports the local target in this "
                    "version (plan it with `herd plan`)")


def add_lifecycle(sub) -> None:
    up = sub.add_parser("up", help="set up and start a deployment, wait for ready, run the smoke test")
    up.add_argument("environment", help="environments/NAME.yaml")
    up.add_argument("--no-smoke", action="store_true", help="skip the smoke test after ready")
    up.add_argument("--dry-run", action="store_true", help="print the plan and every node's launch; change nothing")
    up.add_argument("--trust-new-hosts", action="store_true",
                    help="on-prem: accept and record host keys not yet in known_hosts (changed keys are "
                         "still refused)")
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="stop a deployment")
    down.add_argument("environment")
    down.set_defaults(func=cmd_down)
    status = sub.add_parser("status", help="is the deployment running and ready")
    status.add_argument("environment")
    status.add_argument("--json", action="store_true")
    status.add_argument("--ca-file", help="CA certificate (PEM) to trust for the https:// endpoint (default: the "
                                          "deployment CA in the environment's state)")
    status.set_defaults(func=cmd_status)


def cmd_up(args) -> int:
    spec = load_spec(args.environment)
    if args.dry_run:
        from provisioning.render import render_launch
        return render_launch(spec, args.environment, Console())
    handler = _target_handler(spec, "up")
    if spec.target == "onprem":
        return handler(spec, args.environment, Console(), smoke=not args.no_smoke,
                       trust_new_hosts=args.trust_new_hosts)
    return handler(spec, args.environment, Console(), smoke=not args.no_smoke)


def cmd_down(args) -> int:
    spec = load_spec(args.environment)
    return _target_handler(spec, "down")(spec, args.environment, Console())


def cmd_status(args) -> int:
    import inspect
    spec = load_spec(args.environment)
    handler = _target_handler(spec, "status")
    extra = {}
    if args.ca_file:
        # Only handlers that reach the endpoint themselves take a CA; elsewhere the flag would be ignored.
        if "ca_file" not in inspect.signature(handler).parameters:
            raise UserError(f"--ca-file: not used by `herd status` for target {spec.target!r} (allowed: "
                            "the local target; use herd smoke --ca-file to check the endpoint)")
        extra["ca_file"] = args.ca_file
    return handler(spec, args.environment, Console(), as_json=args.json, **extra)


def _add_weights(sub) -> None:
    from provisioning.weights.fetching import add_weights
    add_weights(sub)


PROVISIONING_COMMANDS = [*RUNTIME_COMMANDS, add_lifecycle, _add_weights]
