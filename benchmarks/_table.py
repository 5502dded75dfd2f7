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


def _number(cell: str) -> float | None:
    match = re.search(r"[-+]?\d[\d,]*\.?\d*", cell)
    return float(match.group(0).replace(",", "")) if match else None


def save(
    stem: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    out_dir: str,
    group: int,
    label: Sequence[int],
    value: int,
    unit: str,
) -> None:
    """Write the results as ``<stem>.json`` and a bar chart ``<stem>.png`` in ``out_dir``.

    One panel per distinct value of column ``group``; in each, one bar per row, labelled
    by the ``label`` columns, its length the number in column ``value``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine = (
        f"Python {platform.python_version()} on {platform.machine()}, {sys.platform}, "
        f"{os.cpu_count()} CPUs"
    )
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    record = {
        "machine": machine,
        "command": command,
        "headers": list(headers),
        "rows": [list(r) for r in rows],
    }
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")

    groups: dict[str, list[tuple[str, float]]] = {}
    for row in rows:
        number = _number(row[value])
        if number is None:
            continue
        name = " · ".join(row[i] for i in label)
        groups.setdefault(row[group], []).append((name, number))
    fig, axes = plt.subplots(
        len(groups),
        1,
        figsize=(8, 1.2 + 0.42 * sum(len(v) for v in groups.values())),
        squeeze=False,
    )
    for ax, (title, bars) in zip(axes[:, 0], groups.items(), strict=True):
        names = [b[0] for b in bars]
        values = [b[1] for b in bars]
        colours = ["tab:orange" if "threadbridge" in n else "tab:blue" for n in names]
        ax.barh(names, values, color=colours)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_xlabel(f"{headers[value]} ({unit})", fontsize=8)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"{stem}: {machine}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)
    plt.close(fig)
    print(f"\nwrote {out / (stem + '.json')} and {out / (stem + '.png')}")
