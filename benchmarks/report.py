"""The results table (markdown) and a description of the machine it was measured on."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from benchmarks.common import Row


def machine() -> dict[str, object]:
    """CPU count, memory, GPU (if any), Python/torch versions, load at the start."""
    info: dict[str, object] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                               "platform": platform.platform()}
    try:
        mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text()
                          .splitlines() if line.startswith("MemTotal:")))
        info["memory_gib"] = round(mem_kb / 2**20, 1)
        info["loadavg_1min"] = os.getloadavg()[0]
    except (OSError, StopIteration):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except ImportError:  # pragma: no cover
        pass
    return info


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def markdown_table(rows: list[Row], info: dict[str, object],
                   runs: list[dict] | None = None) -> str:
    """One markdown table: benchmark, baseline, ours, ratio in favour of ours, target, command.

    ``runs`` (from the merged JSON) lists which run measured which benchmarks.
    """
    head = (f"Measured {info.get('date')} on {info.get('cpus')} CPUs, "
            f"{info.get('memory_gib')} GiB, GPU: {info.get('gpu')}, torch threads "
            f"{info.get('torch_threads')}, load avg at start {info.get('loadavg_1min', 0):.1f}"
            + (" (SMOKE sizes: proves the harness, not the figures)" if info.get("smoke") else ""))
    lines = [head]
    if runs and len(runs) > 1:
        lines += [f"- {r.get('date')} (load avg at start {r.get('loadavg_1min', 0):.1f}): "
                  f"{', '.join(r['keys'])}" for r in runs]
    lines += ["",
             "| benchmark | unit | baseline | value | ours | value | ratio "
             "| target | reproduce |",
             "|---|---|---|---:|---|---:|---:|---|---|"]
    for r in rows:
        ratio = "-" if r.ratio is None else f"**{r.ratio:.2f}x**"
        lines.append(f"| {r.title} | {r.unit} | {r.baseline} | {_fmt(r.baseline_value)} | "
                     f"{r.ours} | {_fmt(r.ours_value)} | {ratio} | {r.target} | "
                     f"`{r.command}` |")
    lines += ["", "Notes:"]
    lines += [f"- **{r.title}**: {r.notes}" for r in rows]
    return "\n".join(lines)
