"""How zk0's performance benchmarks shape, print and compare their figures."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

MIB = 2**20


class BenchError(RuntimeError):
    """The benchmark cannot run here; the message says why."""


def table(headers: list[str], rows: list[list]) -> str:
    """Rows as aligned plain-text columns; floats to four significant digits."""
    cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    # Only the headers' columns are laid out (a longer row's extra cells are left out, as before).
    return "\n".join(
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False)))
        for r in cells
    )


def target(name: str, value: float, limit: float, at_most: bool, unit: str = "") -> dict:
    """One target: the measured value, the limit it must stay under (at_most) or reach, and the verdict."""
    passed = value <= limit if at_most else value >= limit
    return {"target": name, "value": value, "limit": f"{'<=' if at_most else '>='} {limit:g}{unit}", "passed": passed}


def report(result: dict) -> str:
    """The tables and the targets of one benchmark as plain text."""
    lines = [f"== {result['benchmark']} ({'smoke' if result['settings'].get('smoke') else 'full run'})"]
    for t in result["tables"]:
        lines += ["", t["title"], table(t["headers"], t["rows"])]
    lines += ["", "targets:"]
    for t in result["targets"]:
        lines.append(f"  {'PASS' if t['passed'] else 'MISS'} {t['target']}: {t['value']:.4g} (target {t['limit']})")
    lines += [f"note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines)


def as_record(arrays: Mapping[str, np.ndarray]):
    """Numpy arrays as a Flower ArrayRecord, exactly as zk0 packs weights into messages."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
