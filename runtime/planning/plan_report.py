"""How a plan reads: a rich table for people (with a stacked bar of per-device memory), one JSON
object for machines, and an SVG picture of the chosen configuration beside the suggestions."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from rich.console import Console
from rich.table import Table
from rich.text import Text

from runtime.planning.planner import DEFAULT_MAX_NODES, GIB, Hardware, PerDeviceBytes, Plan, PlanRequest, Suggestion, plan

# The stacked bar's parts, bottom (left) up: glyphs tell them apart without colour (logs, CI).
PARTS = (("weights", "weights", "█", "#4c78a8"), ("kv_cache", "KV cache", "▓", "#59a14f"),
         ("overhead", "overhead", "▒", "#f28e2b"))
FREE_GLYPH = "░"
BAR_WIDTH = 48


def _gb(n: int | float) -> str:
    return f"{n / GIB:,.2f} GiB"


# ------------------------------------------------------------------ the terminal bar
def _cells(values: list[float], cells: int) -> list[int]:
    """Whole cells per value, summing to `cells` (largest remainders get the rounding)."""
    floors = [int(v) for v in values]
    order = sorted(range(len(values)), key=lambda i: values[i] - floors[i], reverse=True)
    for i in order[:max(0, cells - sum(floors))]:
        floors[i] += 1
    return floors


def bar_cells(pg: PerDeviceBytes, width: int = BAR_WIDTH, scale_bytes: int | None = None) -> dict[str, int]:
    """Cells of each part in a bar `width` cells wide for `scale_bytes` (default: this device's
    max(total, capacity), so the bar fills the width)."""
    full = max(pg.total, pg.capacity, 1)
    scale = width / max(scale_bytes or full, full)
    used = [getattr(pg, key) * scale for key, *_ in PARTS]
    free = max(0, pg.capacity - pg.total) * scale
    counts = _cells([*used, free], round(full * scale))
    return {**{key: n for (key, *_), n in zip(PARTS, counts)}, "free": counts[-1]}


def memory_bar(pg: PerDeviceBytes, width: int = BAR_WIDTH, scale_bytes: int | None = None) -> Text:
    """[████▓▓▒░░░]: weights, KV cache, overhead, then what is left of the capacity; past the
    capacity (does not fit) the cells are red. Bars drawn with one `scale_bytes` compare by length."""
    cells = bar_cells(pg, width, scale_bytes)
    full = max(pg.total, pg.capacity, 1)
    capacity_cells = round(sum(cells.values()) * pg.capacity / full)
    text = Text("[", no_wrap=True)
    at = 0
    for key, _, glyph, colour in PARTS:
        for _ in range(cells[key]):
            text.append(glyph, style="bold red" if at >= capacity_cells else colour)
            at += 1
    text.append(FREE_GLYPH * cells["free"], style="dim")
    text.append("]" + " " * (width - sum(cells.values())))
    return text


def usage_text(pg: PerDeviceBytes) -> Text:
    share = pg.total / pg.capacity if pg.capacity else float("inf")
    return Text(f"{pg.total / GIB:,.1f} / {pg.capacity / GIB:,.1f} GiB ({share:.0%})",
                style="bold red" if pg.total > pg.capacity else "")


def bar_legend(pg: PerDeviceBytes) -> Text:
    text = Text("  ")
    for key, label, glyph, colour in PARTS:
        text.append(glyph, style=colour)
        text.append(f" {label} {getattr(pg, key) / GIB:,.1f}  ")
    if pg.total <= pg.capacity:
        text.append(FREE_GLYPH, style="dim")
        text.append(f" free {(pg.capacity - pg.total) / GIB:,.1f}  (GiB)")
    else:
        text.append(f"(GiB)  {(pg.total - pg.capacity) / GIB:,.1f} over capacity", style="bold red")
    return text


# ------------------------------------------------------------------ the suggestions' own plans
def suggestion_plans(req: PlanRequest, result: Plan) -> list[tuple[Suggestion, Plan]]:
    """Each suggestion planned in full (the planner keeps only its shape and price): the same
    request on that instance, quantization and TP x PP, as `planner.suggestions` planned it."""
    out = []
    for s in result.suggestions:
        candidate = replace(req, hardware=Hardware.from_instance(s.instance, max_nodes=DEFAULT_MAX_NODES),
                            quantization=s.quantization, tensor=s.tensor_parallel,
                            pipeline=s.pipeline_parallel, nodes="auto",
                            dtype="bfloat16" if req.dtype == "float32" else req.dtype)
        out.append((s, plan(candidate, suggest=False)))
    return out


# ------------------------------------------------------------------ the table
def render(result: Plan, console: Console, request: PlanRequest | None = None) -> None:
    verdict = "[bold green]FITS[/]" if result.fits else "[bold red]DOES NOT FIT[/]"
    groups = f"{result.replicas} replicas x " if result.replicas > 1 else ""
    console.print(f"{verdict}  {result.model} ({result.quantization}, {result.dtype}) on {groups}{_where(result)}  "
                  f"engine={result.engine}")
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="dim")
    table.add_column()
    pg = result.per_gpu_bytes
    rows = [
        ("parallelism", f"TP {result.tensor_parallel} x PP {result.pipeline_parallel} "
                        f"({result.nodes} node(s) x {result.gpus_per_node} device(s))"),
        ("parameters", f"{result.parameters / 1e9:,.2f} B ({_gb(result.weights_total_bytes)} of weights)"),
        ("per device: weights", _gb(pg.weights)),
        ("per device: KV cache", _gb(pg.kv_cache)),
        ("per device: overhead", f"{_gb(pg.overhead)}  ("
         + ", ".join(f"{k} {_gb(v)}" for k, v in result.overhead_breakdown.items() if v) + ")"),
        ("per device: total / capacity", f"{_gb(pg.total)} / {_gb(pg.capacity)}"),
        ("max KV tokens", f"{result.max_kv_tokens:,}"),
        ("decode floor", f"{result.decode_ms_per_token_floor:.2f} ms/step "
                         f"(ceiling {result.tokens_per_s_ceiling:,.0f} tok/s at full batch)"),
        ("cold start (est.)", f"{result.cold_start_s / 60:.1f} min"),
    ]
    if result.cost_usd_per_hour is not None:
        rows.append(("cost", f"${result.cost_usd_per_hour:,.2f}/h, ${result.cost_usd_per_million_tokens:,.2f} "
                             f"per M output tokens at the floor (prices of {result.price_date})"))
    if result.replicas > 1:
        # Everything above is one group; these are the deployment's totals.
        rows.append(("replicas", f"{result.replicas} groups: {result.total_nodes} node(s), "
                                 f"{result.total_devices} device(s) in all"))
        rows.append(("all replicas: ceiling", f"{result.total_tokens_per_s_ceiling:,.0f} tok/s at full batch"))
        if result.total_cost_usd_per_hour is not None:
            rows.append(("all replicas: cost", f"${result.total_cost_usd_per_hour:,.2f}/h"))
    for key, value in rows:
        table.add_row(key, value)
    # The bar fills what the value column has left on this console (80 columns when piped).
    width = max(10, min(BAR_WIDTH, console.width - 34))
    table.add_row("per device: memory", memory_bar(pg, width))
    table.add_row("", usage_text(pg))
    console.print(table)
    console.print(bar_legend(pg), soft_wrap=False)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    for reason in result.reasons:
        console.print(f"[red]reason:[/] {reason}")
    if result.suggestions:
        console.print("[bold]configurations that fit, cheapest first:[/]")
        sug = Table("instance", "nodes", "quantization", "TP x PP", "$/h")
        for s in result.suggestions:
            sug.add_row(s.instance, str(s.nodes), s.quantization, f"{s.tensor_parallel} x {s.pipeline_parallel}",
                        f"{s.cost_usd_per_hour:,.2f}")
        console.print(sug)
        if request is not None:
            console.print("[bold]memory per device, this configuration and the suggestions:[/]")
            side = Table(show_header=False, box=None, pad_edge=False)
            side.add_column(style="dim", no_wrap=True)
            side.add_column(no_wrap=True)
            side.add_column(no_wrap=True)
            rows = [("this", result)] + [(f"{s.instance} {s.quantization}", p)
                                         for s, p in suggestion_plans(request, result)]
            label_width = max(len(name) for name, _ in rows)
            bar_width = max(10, min(BAR_WIDTH, console.width - label_width - 30))
            # One scale for all: a longer bar is more memory per device.
            scale = max(max(p.per_gpu_bytes.total, p.per_gpu_bytes.capacity) for _, p in rows)
            for name, p in rows:
                side.add_row(name, memory_bar(p.per_gpu_bytes, bar_width, scale), usage_text(p.per_gpu_bytes))
            console.print(side)
    elif not result.fits:
        console.print("[red]no catalog configuration fits this model and context[/]")


# ------------------------------------------------------------------ the SVG
SVG_NS = "http://www.w3.org/2000/svg"
PLOT_HEIGHT = 320          # px for the tallest column (max of total and capacity over all columns)
COLUMN_WIDTH, BAR_PX, TOP, LEFT = 150, 64, 56, 70


def _where(p: Plan) -> str:
    """"2 x p5.48xlarge", or for a TPU slice "1 x v6e-16 slice (4 hosts)": a slice comes whole."""
    if p.slice_hosts is not None:
        return f"1 x {p.instance} slice ({p.slice_hosts} host{'s' if p.slice_hosts > 1 else ''})"
    return f"{p.nodes} x {p.instance or p.accelerator}"


def _label(p: Plan) -> list[str]:
    return [_where(p), f"{p.quantization}, TP {p.tensor_parallel} x PP {p.pipeline_parallel}"]


def plan_svg(result: Plan, request: PlanRequest | None = None) -> str:
    """Per-device memory of the chosen configuration and each suggestion, side by side: stacked
    rectangles (weights, KV cache, overhead) against a dashed outline of the usable capacity, all
    on one scale (data-bytes-per-px on the root element), written by hand (no plotting library)."""
    columns: list[tuple[str, Plan]] = [("chosen", result)]
    if request is not None:
        columns += [(f"suggestion {i + 1}", p) for i, (_, p) in enumerate(suggestion_plans(request, result))]
    tallest = max(max(p.per_gpu_bytes.total, p.per_gpu_bytes.capacity) for _, p in columns)
    per_px = max(tallest, 1) / PLOT_HEIGHT
    width = LEFT + COLUMN_WIDTH * len(columns) + 20
    height = TOP + PLOT_HEIGHT + 100
    base = TOP + PLOT_HEIGHT      # the bars' bottom edge
    out = [f'<svg xmlns="{SVG_NS}" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'font-family="sans-serif" font-size="11" data-bytes-per-px="{per_px!r}">',
           f"<title>{escape(f'herd plan: {result.model}, memory per device')}</title>",
           f'<text x="{LEFT}" y="20" font-size="14" font-weight="bold">'
           f"{escape(f'{result.model}: memory per device (GiB)')}</text>"]
    # Legend and a GiB axis.
    x = LEFT
    for key, label, _, colour in PARTS:
        out.append(f'<rect x="{x}" y="30" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{x + 14}" y="39">{escape(label)}</text>')
        x += 90
    out.append(f'<line x1="{x}" y1="35" x2="{x + 14}" y2="35" stroke="#d62728" stroke-dasharray="4 2"/>'
               f'<text x="{x + 18}" y="39">usable capacity</text>')
    step = _axis_step(tallest / GIB)
    tick = 0.0
    while tick * GIB <= tallest:
        y = base - tick * GIB / per_px
        out.append(f'<line x1="{LEFT - 4}" y1="{y:.2f}" x2="{width - 20}" y2="{y:.2f}" stroke="#eee"/>'
                   f'<text x="{LEFT - 8}" y="{y + 4:.2f}" text-anchor="end">{tick:g}</text>')
        tick += step
    for i, (name, p) in enumerate(columns):
        pg = p.per_gpu_bytes
        cx = LEFT + i * COLUMN_WIDTH + (COLUMN_WIDTH - BAR_PX) / 2
        fits = "fits" if p.fits else "does not fit"
        out.append(f'<g class="config" data-name={quoteattr(name)} data-fits="{str(p.fits).lower()}">')
        y = float(base)
        for key, label, _, colour in PARTS:
            h = getattr(pg, key) / per_px
            y -= h
            out.append(f'<rect class="{key}" x="{cx:.2f}" y="{y:.4f}" width="{BAR_PX}" height="{h:.4f}" '
                       f'fill="{colour}" data-bytes="{getattr(pg, key)}">'
                       f"<title>{escape(f'{label}: {getattr(pg, key) / GIB:,.2f} GiB')}</title></rect>")
        cap_h = pg.capacity / per_px
        out.append(f'<rect class="capacity" x="{cx - 4:.2f}" y="{base - cap_h:.4f}" width="{BAR_PX + 8}" '
                   f'height="{cap_h:.4f}" fill="none" stroke="#d62728" stroke-width="2" stroke-dasharray="5 3" '
                   f'data-bytes="{pg.capacity}"><title>{escape(f"usable capacity {pg.capacity / GIB:,.2f} GiB")}'
                   f"</title></rect>")
        mid = cx + BAR_PX / 2
        lines = [name, *_label(p), f"{pg.total / GIB:,.1f} / {pg.capacity / GIB:,.1f} GiB", fits]
        if p.cost_usd_per_hour is not None:
            lines.append(f"${p.cost_usd_per_hour:,.2f}/h")
        for j, line in enumerate(lines):
            weight = ' font-weight="bold"' if j == 0 else ""
            colour = ' fill="#d62728"' if line == fits and not p.fits else ""
            out.append(f'<text x="{mid:.2f}" y="{base + 16 + 13 * j}" text-anchor="middle"{weight}{colour}>'
                       f"{escape(line)}</text>")
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _axis_step(top_gib: float) -> float:
    """A round tick step giving 4 to 10 ticks."""
    step = 1.0
    while top_gib / step > 10:
        step *= 2.5 if str(step).startswith("2") else 2
    while top_gib / step < 4 and step > 0.01:
        step /= 2
    return step


def write_svg(path: str | Path, result: Plan, request: PlanRequest | None = None) -> Path:
    path = Path(path)
    path.write_text(plan_svg(result, request), encoding="utf-8")
    return path
