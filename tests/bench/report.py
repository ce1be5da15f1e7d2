"""The outputs of a run: a table on stdout, JSON and a latency plot under `results/`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def key_figures(name: str, result: dict[str, Any]) -> list[tuple[str, Any]]:
    """The few figures of a scenario worth a line in the table."""
    if "error" in result:
        return [("error", result["error"])]
    figures: list[tuple[str, Any]] = []
    name = name.split("#")[0]
    if name == "idle":
        figures += [
            ("streams open", result["steps"][-1]["opened"]),
            (
                "RSS growth KB/stream (total / marginal)",
                _pair(result, "growth_kb_per_stream", "marginal_kb_per_stream"),
            ),
            (
                "broker RSS MB base -> all open",
                _mb(result["base_rss_kb"], result["steps"][-1]["rss_kb"]),
            ),
            ("connects/s (last step)", result["steps"][-1]["connects_per_s"]),
            ("PostgreSQL backends (all / listening)", _backends(result["backends"])),
        ]
    elif name == "fanout":
        for phase, data in result["phases"].items():
            latency = data.get("latency_ms", {})
            figures.append(
                (
                    f"{phase}: delivered %, deliveries/s, p50/p90/p99/max ms",
                    f"{data.get('completeness_percent')}%  {_k(data.get('deliveries_per_s'))}/s  "
                    f"{_lat(latency)}",
                )
            )
        burst = result["phases"].get("max", {})
        figures += [
            (
                "max: writer rows/s, sustained deliveries/s",
                f"{burst.get('writer_rows_per_s')}  {_k(burst.get('sustained_per_s'))}/s",
            ),
            (
                "peak RSS MB (bound)",
                f"{result['peak_rss_kb'] / 1024:.0f} ({result['memory_bound_kb'] / 1024:.0f})",
            ),
        ]
    elif name == "spread":
        figures += [
            ("delivered %", result.get("completeness_percent")),
            ("latency p50/p90/p99/max ms", _lat(result.get("latency_ms", {}))),
            ("broker CPU (share of a core)", result.get("broker_cpu")),
        ]
    elif name == "churn":
        figures += [
            ("streams opened/closed", result["run"].get("streams")),
            ("RSS MB before -> after", _mb(result["before"]["rss_kb"], result["after"]["rss_kb"])),
            (
                "fds before -> after",
                f"{result['before']['open_fds']} -> {result['after']['open_fds']}",
            ),
            (
                "TCP sockets before -> after",
                f"{result['before']['tcp_sockets']} -> {result['after']['tcp_sockets']}",
            ),
            (
                "threads before -> after",
                f"{result['before']['threads']} -> {result['after']['threads']}",
            ),
        ]
    elif name == "relay":
        figures += [
            ("DB alone rows/s", result["db_alone_rows_per_s"]),
            ("DB + bare LISTEN connection rows/s", result.get("db_with_bare_listener_rows_per_s")),
            (
                "with broker: committed, delivered rows/s",
                f"{result['with_broker_rows_per_s']}  {result['delivered_rows_per_s']}",
            ),
            ("latency p50/p99/max ms", _lat(result.get("latency_ms", {}))),
            ("broker CPU (share of a core)", result.get("broker_cpu")),
            ("broker CPU us per row relayed", result.get("broker_cpu_us_per_row")),
        ]
        batch = result.get("batch", {})
        figures += [
            (
                f"{batch.get('rows_per_statement')} rows/statement: committed, delivered rows/s",
                f"{batch.get('committed_rows_per_s')}  {batch.get('deliveries_per_s')}",
            ),
            ("  latency p50/p99/max ms", _lat(batch.get("latency_ms", {}))),
            ("  broker CPU us per row relayed", batch.get("broker_cpu_us_per_row")),
        ]
        figures += [
            (f"floor ({name.replace('_', ' ')}): CPU us per row", floor.get("cpu_us_per_row"))
            for name, floor in result.get("floor", {}).items()
        ]
        calls = result.get("syscalls_per_row", {})
        figures.append(
            (
                f"system calls per row at {calls.get('rows_per_s')} rows/s",
                "  ".join(f"{k} {v}" for k, v in calls.items() if k != "rows_per_s") or "-",
            )
        )
    elif name == "capture":
        modes = ("none", "notify", "wal", "wal-recvlogical")
        for writers, row in result["inserts"].items():
            present = [mode for mode in modes if mode in row]
            figures.append(
                (
                    f"INSERT rows/s at {writers} writers: " + " / ".join(present),
                    "  ".join(
                        f"{row[mode]['tps']}"
                        + (f" ({row[mode].get('ratio')})" if mode != "none" else "")
                        for mode in present
                    ),
                )
            )
            figures.append(
                (
                    f"  {writers} writers: walsender share of CPU 1, cpu_ratio: wal / recvlogical",
                    " / ".join(
                        f"{(row[mode].get('cpu') or {}).get('walsender')},"
                        f" {row[mode].get('cpu_ratio')}"
                        for mode in ("wal", "wal-recvlogical")
                        if mode in row
                    ),
                )
            )
        for mode, lat in result["latency"].items():
            figures.append(
                (f"{mode}: delivery p50 / p99 ms at 500 rows/s", _pair(lat, "p50", "p99"))
            )
        outage = result["outage"]
        figures.append(
            (
                f"slot lag after a {outage['outage_s']} s reader outage (bytes, s), drained in",
                f"{outage['lag_at_end'].get('bytes')}  {outage['lag_at_end'].get('seconds')}"
                f"  {outage['drained_s']} s",
            )
        )
    return figures


def _pair(result: dict[str, Any], a: str, b: str) -> str:
    return f"{result.get(a)} / {result.get(b)}"


def _mb(before_kb: int, after_kb: int) -> str:
    return f"{before_kb / 1024:.1f} -> {after_kb / 1024:.1f}"


def _backends(backends: dict[str, int]) -> str:
    return f"{backends['client_backends']} / {backends['listening_backends']}"


def _k(value: float | None) -> str:
    return "-" if value is None else f"{value / 1000:.1f}k"


def _lat(latency: dict[str, Any]) -> str:
    keys = ("p50", "p90", "p99", "max")
    return "/".join("-" if latency.get(k) is None else f"{latency[k]:.1f}" for k in keys)


def table(results: dict[str, Any]) -> str:
    """Key figures and targets of every scenario, as aligned text."""
    rows: list[tuple[str, str, str, str]] = []
    for name, result in results["scenarios"].items():
        for label, value in key_figures(name, result):
            rows.append((name, label, str(value), ""))
        for item in result.get("targets", []):
            verdict = {True: "PASS", False: "FAIL", None: "n/a"}[item["ok"]]
            rows.append((name, "target: " + item["target"], str(item["value"]), verdict))
    widths = [max(len(row[i]) for row in rows) if rows else 0 for i in range(4)]
    widths[2] = min(widths[2], 60)
    lines = []
    previous = None
    for row in rows:
        if previous is not None and row[0] != previous:
            lines.append("")
        previous = row[0]
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    return "\n".join(lines)


def write_json(results: dict[str, Any], directory: Path, stamp: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    latest = directory / "latest.json"
    tmp = directory / "latest.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    tmp.replace(latest)
    shutil.copyfile(latest, directory / f"run-{stamp}.json")
    return latest


def plot(results: dict[str, Any], path: Path) -> Path | None:
    """Latency percentiles against offered load (deliveries/s); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    scenarios = results["scenarios"]
    figure, axis = plt.subplots(figsize=(9, 5.5), dpi=110)
    runs = [
        key for key in scenarios if key.split("#")[0] == "fanout" and "phases" in scenarios[key]
    ]
    styles = {"p50": "o", "p90": "s", "p99": "^", "max": "x"}
    colors = {"p50": "tab:blue", "p90": "tab:orange", "p99": "tab:green", "max": "tab:red"}
    for number, run in enumerate(runs):
        points = _fanout_points(scenarios[run]["phases"])
        others = [
            data.get("cpu0_others")
            for data in scenarios[run]["phases"].values()
            if data.get("cpu0_others") is not None
        ]
        busy = f", others took up to {max(others):.0%} of CPU 0" if others else ""
        line = "-" if number == 0 else "--"
        for key, marker in styles.items():
            if number and key == "p90":
                continue  # keep the re-runs readable: p50, p99 and max
            xs = [p[0] for p in points]
            ys = [max(p[2][key], 0.01) for p in points]
            if xs:
                axis.plot(
                    xs,
                    ys,
                    marker + line,
                    color=colors[key],
                    alpha=1.0 if number == 0 else 0.55,
                    label=f"{run} 1000 subs {key}{busy if key == 'p50' else ''}",
                )
        if number == 0:
            for x, phase, latency in points:
                axis.annotate(
                    phase,
                    (x, max(latency["p99"], 0.01)),
                    textcoords="offset points",
                    xytext=(4, 6),
                    fontsize=8,
                )
    for name, marker in (("spread", "D"), ("relay", "P")):
        data = scenarios.get(name, {})  # the first run of each
        latency = data.get("latency_ms") or {}
        if latency.get("p99") is None:
            continue
        offered = data.get("offered_deliveries_per_s") or data.get("with_broker_rows_per_s")
        axis.plot(
            [offered] * 3,
            [latency["p50"], latency["p99"], latency["max"]],
            marker,
            linestyle=":",
            label=f"{name} (p50, p99, max)",
        )
    axis.axhline(20, color="grey", linewidth=0.8, linestyle="--")
    axis.annotate(
        "20 ms: fanout target at 50 rows/s",
        (0.01, 20),
        xycoords=("axes fraction", "data"),
        xytext=(0, 3),
        textcoords="offset points",
        fontsize=8,
        color="grey",
    )
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("offered load, deliveries per second (rows/s x matching subscribers)")
    axis.set_ylabel("commit -> client receive latency, ms")
    meta = results.get("meta", {})
    axis.set_title(
        f"pgsse latency vs load — {meta.get('date', '')}, broker on 1 core of "
        f"{meta.get('machine', {}).get('cpus', '?')}"
    )
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def _fanout_points(phases: dict[str, Any]) -> list[tuple[float, str, dict[str, Any]]]:
    """(offered deliveries/s, phase, latency) per fanout phase, by offered load."""
    points = []
    for phase, data in phases.items():
        offered = data.get("offered_deliveries_per_s")
        if offered is None:  # the burst: its offer is the writer's rate times the subscribers
            offered = (data.get("writer_rows_per_s") or 0) * data.get("streams", 0)
        if offered and data.get("latency_ms", {}).get("p50") is not None:
            points.append((offered, phase, data["latency_ms"]))
    return sorted(points, key=lambda point: point[0])
