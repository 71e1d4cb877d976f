"""How a plan reads: a rich table for people, one JSON object for machines."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from runtime.planner import GIB, Plan


def _gb(n: int | float) -> str:
    return f"{n / GIB:,.2f} GiB"


def render(plan: Plan, console: Console) -> None:
    verdict = "[bold green]FITS[/]" if plan.fits else "[bold red]DOES NOT FIT[/]"
    where = plan.instance or plan.accelerator
    groups = f"{plan.replicas} replicas x " if plan.replicas > 1 else ""
    console.print(f"{verdict}  {plan.model} ({plan.quantization}, {plan.dtype}) on {groups}{plan.nodes} x {where}"
                  f"  engine={plan.engine}")
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="dim")
    table.add_column()
    pg = plan.per_gpu_bytes
    rows = [
        ("parallelism", f"TP {plan.tensor_parallel} x PP {plan.pipeline_parallel} "
                        f"({plan.nodes} node(s) x {plan.gpus_per_node} device(s))"),
        ("parameters", f"{plan.parameters / 1e9:,.2f} B ({_gb(plan.weights_total_bytes)} of weights)"),
        ("per device: weights", _gb(pg.weights)),
        ("per device: KV cache", _gb(pg.kv_cache)),
        ("per device: overhead", f"{_gb(pg.overhead)}  ("
         + ", ".join(f"{k} {_gb(v)}" for k, v in plan.overhead_breakdown.items() if v) + ")"),
        ("per device: total / capacity", f"{_gb(pg.total)} / {_gb(pg.capacity)}"),
        ("max KV tokens", f"{plan.max_kv_tokens:,}"),
        ("decode floor", f"{plan.decode_ms_per_token_floor:.2f} ms/step "
                         f"(ceiling {plan.tokens_per_s_ceiling:,.0f} tok/s at full batch)"),
        ("cold start (est.)", f"{plan.cold_start_s / 60:.1f} min"),
    ]
    if plan.cost_usd_per_hour is not None:
        rows.append(("cost", f"${plan.cost_usd_per_hour:,.2f}/h, ${plan.cost_usd_per_million_tokens:,.2f} "
                             f"per M output tokens at the floor (prices of {plan.price_date})"))
    if plan.replicas > 1:
        # Everything above is one group; these are the deployment's totals.
        rows.append(("replicas", f"{plan.replicas} groups: {plan.total_nodes} node(s), "
                                 f"{plan.total_devices} device(s) in all"))
        rows.append(("all replicas: ceiling", f"{plan.total_tokens_per_s_ceiling:,.0f} tok/s at full batch"))
        if plan.total_cost_usd_per_hour is not None:
            rows.append(("all replicas: cost", f"${plan.total_cost_usd_per_hour:,.2f}/h"))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {note}")
    for reason in plan.reasons:
        console.print(f"[red]reason:[/] {reason}")
    if plan.suggestions:
        console.print("[bold]configurations that fit, cheapest first:[/]")
        sug = Table("instance", "nodes", "quantization", "TP x PP", "$/h")
        for s in plan.suggestions:
            sug.add_row(s.instance, str(s.nodes), s.quantization,
                        f"{s.tensor_parallel} x {s.pipeline_parallel}", f"{s.cost_usd_per_hour:,.2f}")
        console.print(sug)
    elif not plan.fits:
        console.print("[red]no catalog configuration fits this model and context[/]")
