"""Printing the benchmark scripts' results: one table, with the machine it ran on."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from collections.abc import Sequence
from pathlib import Path


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print(f"Python {platform.python_version()} on {platform.machine()}, {sys.platform}")
    print(" | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def _number(cell: str) -> tuple[float, str] | None:
    """The first number in a cell, and the unit written after it."""
    match = re.search(r"[-+]?\d[\d,]*\.?\d*", cell)
    if not match:
        return None
    return float(match.group(0).replace(",", "")), cell[match.end() :].strip()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return " (" + line.split(":", 1)[1].strip() + ")"
    except OSError:
        pass
    return ""


def save(
    stem: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    out_dir: str,
    group: int,
    label: Sequence[int],
    values: Sequence[int],
    note: int | None = None,
) -> None:
    """Write the results as ``<stem>.json``, ``<stem>.md`` and a chart ``<stem>.png``.

    One panel per distinct value of column ``group`` and per column in ``values``; in
    each, one bar per row, labelled by the ``label`` columns. A row whose value is no
    number gets no bar but the text of its ``note`` column, where the bar would be.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine = (
        f"Python {platform.python_version()} on {platform.machine()}, {sys.platform}, "
        f"{os.cpu_count()} CPUs{_cpu_model()}"
    )
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    record = {
        "machine": machine,
        "command": command,
        "headers": list(headers),
        "rows": [list(r) for r in rows],
    }
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    # The same table in Markdown, for the documentation to include.
    lines = [
        f"Measured on {machine} with `{command}`.",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")

    panels: dict[tuple[str, int], list[tuple[str, float | None, str]]] = {}
    for row in rows:
        for column in values:
            name = " · ".join(row[i] for i in label)
            parsed = _number(row[column])
            if parsed is not None:
                panels.setdefault((row[group], column), []).append((name, *parsed))
            elif note is not None and row[note]:
                panels.setdefault((row[group], column), []).append((name, None, row[note]))
    height = 1.0 + sum(0.9 + 0.32 * len(bars) for bars in panels.values())
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, height), squeeze=False)
    for ax, ((title, column), bars) in zip(axes[:, 0], panels.items(), strict=True):
        names = [b[0] for b in bars]
        colours = ["tab:orange" if "threadbridge" in n else "tab:blue" for n in names]
        ax.barh(names, [b[1] or 0.0 for b in bars], color=colours)
        for y, (_, value, text) in enumerate(bars):
            if value is None:
                ax.text(0, y, "  " + text, va="center", fontsize=7, color="tab:red")
        ax.invert_yaxis()
        units = {b[2] for b in bars if b[1] is not None}
        unit = f" ({units.pop()})" if len(units) == 1 else ""
        ax.set_title(f"{title}: {headers[column]}{unit}", fontsize=9, loc="left")
        ax.tick_params(labelsize=8)
    fig.suptitle(f"{stem}: {machine}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=100)
    plt.close(fig)
    print(f"\nwrote {stem}.json, {stem}.md and {stem}.png in {out}")
