"""Draw ``bench/results/bench.png`` from the JSON that micro.py and e2e.py wrote.

Run: ``.venv/bin/python bench/chart.py [--results bench/results]``
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _util
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

OURS = "#1f77b4"
OTHERS = "#9aa5b1"
FLOOR = "#2ca02c"


def _colour(key: str) -> str:
    if key.startswith("pgpool"):
        return OURS
    return FLOOR if key in ("raw", "ceiling") else OTHERS


def _medians(values: dict[str, list[float]]) -> dict[str, float]:
    return {key: _util.median(v) for key, v in values.items()}


def micro_panel(ax: Any, micro: dict[str, Any], section: str, log: bool) -> None:
    sec = micro["sections"][section]
    medians = _medians(sec["values"])
    keys = [k for k in micro.get("order", micro["labels"]) if k in medians]
    labels = [micro["labels"][k] for k in keys]
    y = range(len(keys))
    ax.barh(y, [medians[k] for k in keys], color=[_colour(k) for k in keys])
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(sec["unit"] + (" (log scale, shorter is better)" if sec["unit"] == "ns/op" else
                                 " (longer is better)"))
    ax.set_title(sec["title"], fontsize=10)
    for i, k in enumerate(keys):
        ax.text(medians[k], i, f" {medians[k]:,.0f}", va="center", fontsize=7)


def e2e_panel(ax: Any, e2e: dict[str, Any]) -> None:
    from matplotlib.patches import Patch

    # The JSON's keys are sorted: put sync before gthread again.
    runs = {w: e2e["runs"][w] for w in sorted(e2e["runs"], key=lambda w: (w != "sync", w))}
    keys = [k for k in e2e.get("order", e2e["labels"]) if all(k in r["samples"] for r in runs.values())
            and k not in ("bare", "excluded", "checkout", "pgpool_none", "pgpool_ac")]
    width = 0.8 / max(len(runs), 1)
    for j, (worker, run) in enumerate(runs.items()):
        rps = [_util.median([s["rps"] for s in run["samples"][k]]) for k in keys]
        xs = [i + (j - (len(runs) - 1) / 2) * width for i in range(len(keys))]
        bars = ax.bar(xs, rps, width, label=f"gunicorn {worker}", alpha=1.0 if j == 0 else 0.6,
                      color=[_colour(k) for k in keys], edgecolor="black", linewidth=0.4)
        for bar, value in zip(bars, rps):
            ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:,.0f}", ha="center", va="bottom",
                    fontsize=6, rotation=90)
    ax.set_xticks(range(len(keys)), [_short(e2e["labels"][k]) for k in keys], fontsize=8, rotation=15,
                  ha="right")
    ax.set_ylabel("requests/s (higher is better)")
    ax.set_title("gunicorn, 2 workers, a SELECT %s echo endpoint under wrk", fontsize=10)
    ax.legend(handles=[Patch(facecolor=OTHERS, edgecolor="black", alpha=1.0 if j == 0 else 0.6,
                             label=f"{worker}" + (" (4 threads)" if worker == "gthread" else ""))
                       for j, worker in enumerate(runs)], loc="upper right")


def _short(label: str) -> str:
    return label.split(",")[0].replace(" (psycopg 3)", "").replace(" ConnectionPool", "").replace(
        " ThreadedConnectionPool", " pool")


def draw(results: Path) -> Path | None:
    micro_file, e2e_file = results / "micro.json", results / "e2e.json"
    micro = json.loads(micro_file.read_text()) if micro_file.exists() else None
    e2e = json.loads(e2e_file.read_text()) if e2e_file.exists() else None
    if micro is None and e2e is None:
        return None
    fig = plt.figure(figsize=(14, 11), constrained_layout=True)
    grid = fig.add_gridspec(2, 2) if micro and e2e else fig.add_gridspec(1, 2 if micro else 1)
    if micro:
        micro_panel(fig.add_subplot(grid[0, 0]), micro, "a", log=True)
        micro_panel(fig.add_subplot(grid[0, 1]), micro, "c", log=False)
    if e2e:
        e2e_panel(fig.add_subplot(grid[1, :] if micro else grid[0, 0]), e2e)
    fig.suptitle("pgpool_wsgi benchmarks (blue: pgpool_wsgi, green: floor/ceiling, grey: alternatives)")
    out = results / "bench.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=_util.RESULTS)
    args = parser.parse_args(argv)
    out = draw(args.results)
    print(f"chart: {out}" if out else f"nothing to draw in {args.results}")


if __name__ == "__main__":
    main()
