#!/usr/bin/env python3
"""Medians, markdown tables and SVG plots of scripts/bench-curves.sh's JSON lines.

    python3 bench/plot_curves.py RESULTS.jsonl PLOT_DIR

Prints the tables (markdown) and writes PLOT_DIR/<curve>-<measure>.svg: plain SVG text, no
plotting library (a fresh machine has python3, not matplotlib). Each point is the median of
its runs; the run count is in the tables.
"""
import json
import math
import os
import statistics
import sys

IMPLS = [("ours", "ours (tokio)", "#1f77b4"), ("amqprs", "amqprs 2.1.5", "#d62728")]


def load(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "curve" not in row:
                continue
            if row.get("failed") or "calls_per_sec" not in row:
                # Kept (as failed) so that the runs around it still pair up right.
                rows.append({"curve": row["curve"], "x": row.get("x"), "impl": row.get("impl"), "failed": True})
                continue
            rss = row.get("rss_peak_kib", 0) - row.get("rss_idle_kib", 0)
            row["kib_per_call_in_flight"] = max(rss, 0) / max(row.get("concurrency", 1), 1)
            row["mb_per_sec_each_way"] = min(
                row.get("request_mb_per_sec", 0), row.get("reply_mb_per_sec", 0)
            )
            rows.append(row)
    return rows


def medians(rows, curve, measure):
    """{impl: [(x, median, runs)]} for one curve and measure."""
    out = {}
    rows = [r for r in rows if not r.get("failed")]
    for impl, _, _ in IMPLS:
        xs = sorted({r["x"] for r in rows if r["curve"] == curve and r["impl"] == impl})
        pts = []
        for x in xs:
            vals = [
                r[measure]
                for r in rows
                if r["curve"] == curve and r["impl"] == impl and r["x"] == x
                and r.get(measure) is not None
            ]
            if vals:
                pts.append((x, statistics.median(vals), len(vals)))
        out[impl] = pts
    return out


def paired_ratio(rows, curve, x, measure):
    """Median of ours/amqprs over the k-th run of each at this point (they ran next to each
    other, so a noisy moment hits both): steadier than the ratio of the medians."""
    # The script runs ours, then amqprs, at each point: consecutive lines pair up.
    ratios = []
    for a, b in zip(rows, rows[1:]):
        if (a["curve"], a["x"], a["impl"], b["curve"], b["x"], b["impl"]) != (curve, x, "ours", curve, x, "amqprs"):
            continue
        if a.get("failed") or b.get("failed") or a.get(measure) is None or not b.get(measure):
            continue
        ratios.append(a[measure] / b[measure])
    return statistics.median(ratios) if ratios else None


def fmt(v):
    if v == 0:
        return "0"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def size_label(x):
    for unit, div in (("MB", 1e6), ("kB", 1e3)):
        if x >= div:
            return f"{x / div:g} {unit}"
    return f"{x:g} B"


def nice_ticks(lo, hi, log):
    if log:
        lo_e, hi_e = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        return [10.0**e for e in range(lo_e, hi_e + 1)]
    span = hi - lo if hi > lo else 1.0
    step = 10 ** math.floor(math.log10(span / 4))
    for m in (1, 2, 5, 10):
        if span / (step * m) <= 6:
            step *= m
            break
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 0.5:
        ticks.append(t)
        t += step
    return ticks


def svg_plot(path, title, xlabel, ylabel, series, xlog, ylog, xticks_label=None):
    """A line chart: series = [(label, colour, [(x, y)])]."""
    w, h, left, right, top, bottom = 640, 420, 80, 20, 60, 60
    pts = [p for _, _, s in series for p in s]
    if not pts:
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xlo, xhi = min(xs), max(xs)
    ylo = min(ys) if ylog else 0.0
    yhi = max(ys) * (1.0 if ylog else 1.1)
    if ylog:
        ylo, yhi = 10 ** math.floor(math.log10(max(ylo, 1e-9))), 10 ** math.ceil(math.log10(yhi))
    # The x ticks are the measured points.
    xt = sorted(set(xs))
    yt = nice_ticks(ylo, yhi, ylog)
    ylo, yhi = min(ylo, yt[0]), max(yhi, yt[-1])
    if xlo == xhi:
        xhi = xlo + 1

    def fx(x):
        if xlog:
            a, b, v = math.log10(xlo), math.log10(xhi), math.log10(x)
        else:
            a, b, v = xlo, xhi, x
        return left + (v - a) / (b - a) * (w - left - right)

    def fy(y):
        if ylog:
            a, b, v = math.log10(ylo), math.log10(yhi), math.log10(max(y, ylo))
        else:
            a, b, v = ylo, yhi, y
        return h - bottom - (v - a) / ((b - a) or 1) * (h - top - bottom)

    o = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{w / 2}" y="22" text-anchor="middle" font-size="15">{title}</text>',
    ]
    for t in yt:
        y = fy(t)
        o.append(f'<line x1="{left}" y1="{y:.1f}" x2="{w - right}" y2="{y:.1f}" stroke="#ddd"/>')
        o.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{fmt(t)}</text>')
    for t in xt:
        x = fx(t)
        label = xticks_label(t) if xticks_label else fmt(t)
        o.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{h - bottom}" stroke="#eee"/>')
        o.append(f'<text x="{x:.1f}" y="{h - bottom + 18}" text-anchor="middle">{label}</text>')
    o.append(
        f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" '
        'fill="none" stroke="#444"/>'
    )
    o.append(f'<text x="{(left + w - right) / 2}" y="{h - 18}" text-anchor="middle">{xlabel}</text>')
    o.append(
        f'<text transform="translate(18,{(top + h - bottom) / 2}) rotate(-90)" '
        f'text-anchor="middle">{ylabel}</text>'
    )
    for i, (label, colour, s) in enumerate(series):
        if not s:
            continue
        path_d = " ".join(f"{fx(x):.1f},{fy(y):.1f}" for x, y in s)
        o.append(f'<polyline points="{path_d}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in s:
            o.append(f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="3.5" fill="{colour}"/>')
        # The legend: one row between the title and the plot.
        lx, ly = left + i * 180, top - 14
        o.append(f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 24}" y2="{ly - 4}" stroke="{colour}" stroke-width="2"/>')
        o.append(f'<text x="{lx + 30}" y="{ly}">{label}</text>')
    o.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(o) + "\n")


# curve -> (x label, x log, x tick label, [(measure, y label, y log, file suffix)])
CURVES = {
    "payload": (
        "request body (echoed back), C=4, prefetch 4",
        True,
        size_label,
        [("mb_per_sec_each_way", "MB/s each way", True, "mbps"), ("p99_us", "p99 µs", True, "p99")],
    ),
    "concurrency": (
        "calls in flight (one client connection, one server, prefetch 64)",
        True,
        lambda x: f"{x:g}",
        [
            ("calls_per_sec", "calls/s", False, "rate"),
            ("p99_us", "p99 µs", True, "p99"),
            ("kib_per_call_in_flight", "client KiB per call in flight", True, "memory"),
        ],
    ),
    "servers": (
        "server processes on one queue (C=64, prefetch 64 each)",
        False,
        lambda x: f"{x:g}",
        [("calls_per_sec", "calls/s", False, "rate")],
    ),
    "connections": (
        "client connections sharing C=64 calls (one server, prefetch 64)",
        True,
        lambda x: f"{x:g}",
        [("calls_per_sec", "calls/s", False, "rate")],
    ),
}

TABLE_MEASURES = [
    ("calls_per_sec", "calls/s"),
    ("mb_per_sec_each_way", "MB/s each way"),
    ("p50_us", "p50 µs"),
    ("p99_us", "p99 µs"),
    ("kib_per_call_in_flight", "client KiB/call in flight"),
    ("client_cpu_us_per_call", "client CPU µs/call"),
    ("servers_cpu_us_per_call", "server CPU µs/call"),
    ("broker_cpu_us_per_call", "broker CPU µs/call"),
]


def table(rows, curve, xlabel, ticklabel):
    measures = [(m, l) for m, l in TABLE_MEASURES if curve == "payload" or m != "mb_per_sec_each_way"]
    if curve != "concurrency":
        measures = [(m, l) for m, l in measures if m != "kib_per_call_in_flight"]
    data = {m: medians(rows, curve, m) for m, _ in measures}
    xs = sorted({r["x"] for r in rows if r["curve"] == curve})
    if not xs:
        return
    print(f"\n### {curve}: {xlabel}\n")
    head = ["point", "measure"] + [name for _, name, _ in IMPLS] + ["ours / amqprs (paired)", "runs"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * 2 + "---:|" * (len(head) - 2))
    for x in xs:
        for m, label in measures:
            vals, runs = [], []
            for impl, _, _ in IMPLS:
                hit = [p for p in data[m][impl] if p[0] == x]
                vals.append(hit[0][1] if hit else None)
                runs.append(str(hit[0][2]) if hit else "0")
            paired = paired_ratio(rows, curve, x, m)
            ratio = f"{paired:.2f}x" if paired is not None else "–"
            cells = [fmt(v) if v is not None else "–" for v in vals]
            print(f"| {ticklabel(x)} | {label} | " + " | ".join(cells) + f" | {ratio} | {'/'.join(runs)} |")


def main():
    results, plot_dir = sys.argv[1], sys.argv[2]
    rows = load(results)
    os.makedirs(plot_dir, exist_ok=True)
    loads = sorted(r["load"] for r in rows if "load" in r)
    failed = sum(1 for r in rows if r.get("failed"))
    for curve, (xlabel, xlog, ticklabel, measures) in CURVES.items():
        table(rows, curve, xlabel, ticklabel)
        for measure, ylabel, ylog, suffix in measures:
            med = medians(rows, curve, measure)
            series = [(name, colour, [(x, y) for x, y, _ in med[impl]]) for impl, name, colour in IMPLS]
            if ylog:
                series = [(n, c, [(x, y) for x, y in s if y > 0]) for n, c, s in series]
            svg_plot(
                os.path.join(plot_dir, f"{curve}-{suffix}.svg"),
                f"{curve}: {ylabel}",
                xlabel,
                ylabel,
                series,
                xlog,
                ylog,
                ticklabel,
            )
    if loads:
        print(
            f"\n1-min load average during the runs: median {statistics.median(loads)} "
            f"(min {loads[0]}, max {loads[-1]}) on {os.cpu_count()} cores; {len(rows)} runs, "
            f"{failed} of them failed (left out)"
        )


if __name__ == "__main__":
    main()
