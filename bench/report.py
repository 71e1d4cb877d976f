"""Benchmark output: JSON lines printed as they are measured, and saved to --out at the end."""
from __future__ import annotations

import json
from pathlib import Path


class Report:
    def __init__(self, header: dict | None = None):
        self.rows: list[dict] = []
        if header is not None:
            self.emit(header)

    def emit(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    def save(self, path: Path | None) -> None:
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(json.dumps(row) for row in self.rows) + "\n")
