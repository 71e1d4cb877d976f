"""`herd plan` as a picture: a stacked bar of per-device memory in the terminal, and `--svg FILE` with
the chosen configuration and the suggestions side by side, drawn to the plan's numbers."""
import json
import re
import xml.etree.ElementTree as ET

import pytest

from tests.conftest import ROOT

SVG = "{http://www.w3.org/2000/svg}"
NOT_FITTING = ["--model", "llama-3.1-405b-instruct", "--instance", "p4d.24xlarge", "--quantization", "none",
               "--nodes", "1"]
PARTS = ("weights", "kv_cache", "overhead")
GLYPHS = {"weights": "█", "kv_cache": "▓", "overhead": "▒", "free": "░"}


def columns(svg_path) -> tuple[float, list[dict]]:
    """(bytes per px, [{name, fits, rect class -> (y, height, data-bytes)}]) from the written file."""
    root = ET.parse(svg_path).getroot()          # well-formed XML, or this raises
    assert root.tag == f"{SVG}svg"
    per_px = float(root.get("data-bytes-per-px"))
    found = []
    for g in root.iter(f"{SVG}g"):
        if g.get("class") != "config":
            continue
        rects = {r.get("class"): (float(r.get("y")), float(r.get("height")), int(r.get("data-bytes")))
                 for r in g.iter(f"{SVG}rect")}
        found.append({"name": g.get("data-name"), "fits": g.get("data-fits") == "true", **rects})
    return per_px, found


def assert_drawn_to(column: dict, per_px: float, per_gpu: dict) -> None:
    """Heights are the plan's bytes on the picture's one scale (to the 4 decimals written), stacked
    weights at the bottom, then KV cache, then overhead; the capacity outline likewise."""
    rounding = 0.0001 * per_px
    for part in (*PARTS, "capacity"):
        _, height, _ = column[part]
        assert abs(height * per_px - per_gpu[part]) <= rounding, (column["name"], part, height * per_px, per_gpu[part])
    # Proportions, whatever the scale: weights against capacity.
    assert column["weights"][1] / column["capacity"][1] == pytest.approx(per_gpu["weights"] / per_gpu["capacity"],
                                                                         rel=1e-4)
    bottom = column["capacity"][0] + column["capacity"][1]          # the capacity outline starts at the base
    for part in PARTS:                                               # each part sits on the one below it
        y, height, _ = column[part]
        assert y + height == pytest.approx(bottom, abs=0.001), (column["name"], part)
        bottom = y


def test_svg_shows_the_chosen_configuration_and_each_suggestion_to_scale(herd, tmp_path):
    picture = tmp_path / "plan.svg"
    out = herd("plan", *NOT_FITTING, "--svg", str(picture), "--json")
    assert out.returncode == 1, out.stderr          # does not fit: exit 1, picture written all the same
    chosen_plan = json.loads(out.stdout)
    per_px, drawn = columns(picture)
    assert [c["name"] for c in drawn] == ["chosen"] + [f"suggestion {i + 1}" for i in range(len(chosen_plan["suggestions"]))]
    assert len(drawn) > 2 and not drawn[0]["fits"] and all(c["fits"] for c in drawn[1:])
    assert_drawn_to(drawn[0], per_px, chosen_plan["per_gpu_bytes"])
    # The chosen bar overflows its capacity outline: taller than it, as the plan says.
    assert drawn[0]["weights"][1] > drawn[0]["capacity"][1]

    # Each suggestion's column against `herd plan` for exactly that configuration.
    for suggestion, column in zip(chosen_plan["suggestions"], drawn[1:]):
        alone = herd("plan", "--model", "llama-3.1-405b-instruct", "--instance", suggestion["instance"],
                     "--quantization", suggestion["quantization"], "--tensor", str(suggestion["tensor_parallel"]),
                     "--pipeline", str(suggestion["pipeline_parallel"]), "--json")
        assert alone.returncode == 0, alone.stderr
        planned = json.loads(alone.stdout)
        assert planned["nodes"] == suggestion["nodes"]
        assert_drawn_to(column, per_px, planned["per_gpu_bytes"])

    # One scale: the tallest column (total or capacity) is the plot's full height.
    tallest = max(max(c["capacity"][1], sum(c[p][1] for p in PARTS)) for c in drawn)
    assert tallest == pytest.approx(320, abs=0.001)


def test_svg_for_a_plan_that_fits_has_one_column(herd, tmp_path):
    picture = tmp_path / "fits.svg"
    out = herd("plan", str(ROOT / "environments" / "aws-p5-405b-fp8.yaml"), "--svg", str(picture))
    assert out.returncode == 0, out.stderr
    assert f"wrote {picture}" in out.stdout.replace("\n", "")
    per_px, drawn = columns(picture)
    assert [c["name"] for c in drawn] == ["chosen"] and drawn[0]["fits"]
    data = json.loads(herd("plan", str(ROOT / "environments" / "aws-p5-405b-fp8.yaml"), "--json").stdout)
    assert_drawn_to(drawn[0], per_px, data["per_gpu_bytes"])

    refused = herd("plan", str(ROOT / "environments" / "aws-p5-405b-fp8.yaml"), "--svg", str(tmp_path / "no" / "x.svg"))
    assert refused.returncode == 2 and "--svg" in refused.stderr


def bar_of(line: str) -> dict[str, int]:
    inside = re.search(r"\[([█▓▒░]+)\]", line).group(1)
    return {part: inside.count(glyph) for part, glyph in GLYPHS.items()}


def test_terminal_bar_is_proportional_to_the_plan(herd):
    env = str(ROOT / "environments" / "aws-p5-405b-fp8.yaml")
    text = herd("plan", env).stdout
    data = json.loads(herd("plan", env, "--json").stdout)
    pg = data["per_gpu_bytes"]
    line = next(line for line in text.splitlines() if line.startswith("per device: memory"))
    cells = bar_of(line)
    width = sum(cells.values())
    assert width >= 10
    full = max(pg["total"], pg["capacity"])
    expected = {**{p: pg[p] / full * width for p in PARTS}, "free": (pg["capacity"] - pg["total"]) / full * width}
    for part, n in cells.items():
        assert abs(n - expected[part]) <= 1, (part, n, expected[part], line)
    assert "█ weights" in text and "▓ KV cache" in text and "░ free" in text


def test_terminal_shows_the_suggestions_bars_on_one_scale(herd):
    out = herd("plan", *NOT_FITTING)
    assert out.returncode == 1
    text = out.stdout
    assert "65.8 over capacity" in text
    side = text[text.index("memory per device, this configuration and the suggestions:"):].splitlines()[1:]
    rows = [line for line in side if "[" in line]
    data = json.loads(herd("plan", *NOT_FITTING, "--json").stdout)
    assert len(rows) == 1 + len(data["suggestions"])
    lengths = [sum(bar_of(r).values()) for r in rows]
    # The chosen plan (101.8 GiB on a 36 GiB capacity) is the longest; 2 x p4d (36 GiB usable) shorter
    # than p4de (72 GiB usable): lengths follow max(total, capacity) on the one scale.
    assert lengths[0] == max(lengths)
    p4d = [n for r, n in zip(rows, lengths) if r.startswith("p4d.24xlarge")]
    p4de = [n for r, n in zip(rows, lengths) if r.startswith("p4de.24xlarge")]
    assert p4d and p4de and max(p4d) < min(p4de)
    assert abs(min(p4de) / lengths[0] - 72 / 101.83) < 0.05
