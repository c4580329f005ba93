#!/usr/bin/env python3
"""Medians and markdown tables for scripts/bench.sh (its modes call this; no other use).

  summarize.py compare  RESULTS.jsonl   ours vs amqprs per setting
  summarize.py features RESULTS.jsonl   broker CPU per protocol choice
  summarize.py strace LABEL IMPL CALLS CLIENT.strace SERVER.strace   one JSON line
  summarize.py syscalls RESULTS.jsonl   syscalls per call table
  summarize.py runtimes RESULTS.jsonl   current-thread vs multi-thread tokio
  summarize.py walk IMPL EVENTS CLIENT.json   one JSON line: a C=1 call's time, leg by leg
  summarize.py timeline RESULTS.jsonl   the legs' medians, ours vs amqprs
  summarize.py copied IMPL SIZE CALLS COUNTS CLIENT.json   one JSON line: copies per body byte
  summarize.py copies RESULTS.jsonl     copies per body byte, ours vs amqprs
"""
import json
import statistics
import sys
from collections import OrderedDict


def load(path):
    runs = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                run = json.loads(line)
            except ValueError:
                continue
            if not run.get("failed"):
                # The client's memory per call in flight: (peak - idle resident) / C.
                if run.get("rss_peak_kib") and run.get("rss_idle_kib") and run.get("concurrency"):
                    run["kib_per_call_in_flight"] = (
                        (run["rss_peak_kib"] - run["rss_idle_kib"]) / run["concurrency"])
                runs.append(run)
    return runs


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=0):
    if v is None:
        return "-"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def grouped(runs, key):
    groups = OrderedDict()
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    return groups


def medians(group):
    m = {k: med([r.get(k) for r in group]) for k in (
        "calls_per_sec", "p50_us", "p99_us", "client_cpu_us_per_call",
        "server_cpu_us_per_call", "broker_cpu_us_per_call", "kib_per_call_in_flight")}
    both = [r["client_cpu_us_per_call"] + r["server_cpu_us_per_call"] for r in group
            if r.get("server_cpu_us_per_call") is not None]
    m["own_cpu_us_per_call"] = med(both)
    m["runs"] = len(group)
    m["load"] = med([float(r["load"]) for r in group if "load" in r])
    return m


SETTINGS = {
    "c1-p1": "C=1, prefetch 1",
    "c64-p1": "C=64, prefetch 1",
    "c64-p64": "C=64, prefetch 64",
    "c4096-p64": "C=4096, prefetch 64",
}
IMPLS = ["tokio", "smol", "amqprs", "amqprs-plain"]
IMPL_NAMES = {
    "tokio": "ours (tokio)",
    "smol": "ours (smol)",
    "amqprs": "amqprs (as ours)",
    "amqprs-plain": "amqprs (tutorial)",
    "tokio-before": "ours (tokio) before",
}


def paired_ratio(runs, base_runs, value):
    """The median of the ratios of the k-th run of `runs` to the k-th of `base_runs` (run next
    to it: the modes interleave), as text."""
    ratios = [value(x) / value(y) for x, y in zip(runs, base_runs)
              if value(x) is not None and value(y)]
    return f"{statistics.median(ratios):.2f}x" if ratios else "-"


def compare(path):
    comparison(path, IMPLS, [("tokio", "amqprs"), ("smol", "amqprs"), ("tokio", "amqprs-plain")])


def before(path):
    """`bench.sh before REV`: ours at REV, ours now, amqprs."""
    comparison(path, ["tokio-before", "tokio", "amqprs"],
               [("tokio", "tokio-before"), ("tokio", "amqprs"), ("tokio-before", "amqprs")])


def comparison(path, impls, pairs):
    """Medians per setting and implementation, then the paired ratios `pairs` (a / b)."""
    runs = load(path)
    table = {k: medians(g) for k, g in grouped(runs, lambda r: (r["label"], r["impl"])).items()}
    for (label, impl), m in table.items():
        print(json.dumps({"median_of": m["runs"], "label": label, "impl": impl, **m}))
    rows = [
        ("calls/s", "calls_per_sec", 0),
        ("p50 µs", "p50_us", 0),
        ("p99 µs", "p99_us", 0),
        ("client + server CPU µs/call", "own_cpu_us_per_call", 1),
        ("broker CPU µs/call", "broker_cpu_us_per_call", 1),
        ("client KiB per call in flight", "kib_per_call_in_flight", 2),
    ]
    # The ratios are medians of per-round ratios: the k-th run of one implementation against
    # the k-th run of the other in the same setting, which ran next to it (interleaved).
    by_impl = grouped(runs, lambda r: (r["label"], r["impl"]))

    def paired(label, key, a, b):
        value = lambda r: (r["client_cpu_us_per_call"] + (r.get("server_cpu_us_per_call") or 0)
                           if key == "own_cpu_us_per_call" else r.get(key))
        return paired_ratio(by_impl.get((label, a), []), by_impl.get((label, b), []), value)

    print()
    print("| setting | measure | " + " | ".join(IMPL_NAMES[i] for i in impls) + " | "
          + " | ".join(f"{IMPL_NAMES[a]} / {IMPL_NAMES[b]}" for a, b in pairs) + " |")
    print("|---|---|" + "---:|" * (len(impls) + len(pairs)))
    for label, name in SETTINGS.items():
        for title, key, digits in rows:
            values = [table.get((label, i), {}).get(key) for i in impls]
            if all(v is None for v in values):
                continue  # a setting this mode did not run, or a measure it has not
            if key == "kib_per_call_in_flight" and not label.startswith("c4096"):
                continue  # at small C it is mostly buffers that grow once
            cells = [fmt(v, digits) for v in values]
            print(f"| {name} | {title} | " + " | ".join(cells) + " | "
                  + " | ".join(paired(label, key, a, b) for a, b in pairs) + " |")
    loads = [float(r["load"]) for r in runs if "load" in r]
    if loads:
        print(f"\nmedians of {max(m['runs'] for m in table.values())} runs; 1-min load average "
              f"during the runs: median {statistics.median(loads):.1f} "
              f"(min {min(loads):.1f}, max {max(loads):.1f}) on {cpu_count()} cores")


def features(path):
    runs = load(path)
    table = OrderedDict((k, medians(g)) for k, g in grouped(runs, lambda r: r["label"]).items())
    for label, m in table.items():
        print(json.dumps({"median_of": m["runs"], "label": label, **m}))
    # The tutorial form is the base (the first row: round 1 runs in the table's order).
    base = next((m for label, m in table.items() if "tutorial" in label),
                next(iter(table.values()), {})).get("broker_cpu_us_per_call")
    print()
    print("| C=64, prefetch 64 | broker CPU µs/call | vs tutorial | calls/s | "
          "client + server CPU µs/call |")
    print("|---|---:|---:|---:|---:|")
    for label, m in table.items():
        b = m["broker_cpu_us_per_call"]
        delta = "-" if b is None or base is None else f"{b - base:+.1f}"
        print(f"| {label} | {fmt(b, 1)} | {delta} | {fmt(m['calls_per_sec'])} | "
              f"{fmt(m['own_cpu_us_per_call'], 1)} |")


def runtimes(path):
    runs = load(path)
    groups = grouped(runs, lambda r: r["label"])

    def setting_and_threads(label):
        setting, threads = label.split(" threads=")
        return setting, threads

    def order(label):
        setting, threads = setting_and_threads(label)
        return (list(SETTINGS).index(setting) if setting in SETTINGS else 99, int(threads))

    table = OrderedDict((k, medians(groups[k])) for k in sorted(groups, key=order))
    for label, m in table.items():
        print(json.dumps({"median_of": m["runs"], "label": label, **m}))
    print()
    print("| setting | tokio runtime (`--threads`) | calls/s | p50 µs | client + server CPU µs/call "
          "| broker CPU µs/call | calls/s vs current-thread |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, m in table.items():
        setting, threads = setting_and_threads(label)
        ratio = paired_ratio(groups[label], groups.get(f"{setting} threads=0", []),
                             lambda r: r.get("calls_per_sec"))
        runtime = "current-thread (0)" if threads == "0" else f"multi-thread, {threads} workers"
        print(f"| {SETTINGS.get(setting, setting)} | {runtime} | {fmt(m['calls_per_sec'])} | "
              f"{fmt(m['p50_us'])} | {fmt(m['own_cpu_us_per_call'], 1)} | "
              f"{fmt(m['broker_cpu_us_per_call'], 1)} | {ratio} |")


LEGS = [
    ("client_to_server_us", "broker: request (client's send to the server's wake-up)"),
    ("server_turnaround_us", "server: wake-up, read, handler, reply and ack sent"),
    ("server_to_client_us", "broker: reply (server's send to the client's wake-up)"),
    ("client_turnaround_us", "client: wake-up, read, next request sent"),
]


def walk(impl, events_path, client_json):
    """Walks the calls of a C=1 run through the syscall events of both sides, in time order:
    the client's send, the server's wake-up (epoll_wait returns), its read and its first send,
    the client's wake-up and read, then the client's next send. Events out of that order
    (heartbeats, a second epoll_wait) are skipped."""
    import re
    events = []
    with open(events_path) as f:
        for line in f:
            m = re.match(r"(client|server)\s+\d+\s+([\d.]+):\s+syscalls:(\S+):", line)
            if m:
                events.append((float(m.group(2)) * 1e6, m.group(1), m.group(3)))
    events.sort()
    legs = {k: [] for k, _ in LEGS}
    state, last = None, 0.0
    for t, side, e in events:
        if side == "client" and e == "sys_enter_sendto":
            if state == "client_read":
                legs["client_turnaround_us"].append(t - last)
            state, last = "client_sent", t
        elif side == "server" and e == "sys_exit_epoll_wait" and state == "client_sent":
            legs["client_to_server_us"].append(t - last)
            state, last = "server_woke", t
        elif side == "server" and e == "sys_enter_sendto" and state in ("server_woke", "server_read"):
            legs["server_turnaround_us"].append(t - last)
            state, last = "server_sent", t
        elif side == "server" and e == "sys_exit_recvfrom" and state == "server_woke":
            state = "server_read"  # the turnaround counts from the wake-up, read included
        elif side == "client" and e == "sys_exit_epoll_wait" and state == "server_sent":
            legs["server_to_client_us"].append(t - last)
            state, last = "client_woke", t
        elif side == "client" and e == "sys_exit_recvfrom" and state == "client_woke":
            state = "client_read"
    out = {"impl": impl, "load": open("/proc/loadavg").read().split()[0]}
    for k, v in legs.items():
        out[k] = med(v)
        out[k.replace("_us", "_n")] = len(v)
    try:
        with open(client_json) as f:
            out["p50_us"] = json.loads(f.read().strip().splitlines()[-1]).get("p50_us")
    except (OSError, ValueError, IndexError):
        out["p50_us"] = None
    print(json.dumps(out))


def timeline(path):
    runs = load(path)
    by_impl = grouped(runs, lambda r: r["impl"])
    print()
    print("| C=1, prefetch 1: median µs per call | ours (tokio) | amqprs (as ours) |")
    print("|---|---:|---:|")
    for key, title in LEGS + [("p50_us", "the call, end to end (the bench's p50)")]:
        cells = [fmt(med([r.get(key) for r in by_impl.get(i, [])])) for i in ("tokio", "amqprs")]
        print(f"| {title} | " + " | ".join(cells) + " |")
    print(f"\nmedians of {max((len(g) for g in by_impl.values()), default=0)} runs")


def copied(impl, size, calls, counts_path, client_json):
    """Reads the counter's lines ("<comm> <pid> <bytes> <copies>", the server's and the
    client's) into one JSON line of copies per body byte each way."""
    size, calls = int(size), int(calls)
    out = {"impl": impl, "body_bytes": size, "calls": calls}
    with open(counts_path) as f:
        for line in f:
            comm, _pid, copied_bytes, _copies = line.split()[:4]
            # (`timeout`, which runs the client, reports its own zero line.)
            side = "server" if "server" in comm else "client" if "bench" in comm else None
            if side is None:
                continue
            out[f"{side}_copies_per_byte"] = round(int(copied_bytes) / (calls * size * 2), 2)
    try:
        with open(client_json) as f:
            run = json.loads(f.read().strip().splitlines()[-1])
        out["mb_per_sec"] = run.get("request_mb_per_sec")
        out["errors"] = run.get("errors")
    except (OSError, ValueError, IndexError):
        out["failed"] = True
    print(json.dumps(out))


def copies(path):
    runs = load(path)
    print()
    print("| body | side | ours (tokio): bytes copied per body byte, each way | amqprs | "
          "MB/s each way, ours / amqprs |")
    print("|---|---|---:|---:|---:|")
    by = {(r["body_bytes"], r["impl"]): r for r in runs}
    for size in sorted({r["body_bytes"] for r in runs}):
        ours, theirs = by.get((size, "tokio"), {}), by.get((size, "amqprs"), {})
        for side in ("client", "server"):
            key = f"{side}_copies_per_byte"
            print(f"| {size:,} B | {side} | {fmt(ours.get(key), 2)} | {fmt(theirs.get(key), 2)} | "
                  f"{fmt(ours.get('mb_per_sec'), 0)} / {fmt(theirs.get('mb_per_sec'), 0)} |")


# Socket writes: std's and mio's TcpStream writes are send(2), which strace shows as sendto.
# A bare write(2) is counted apart: on tokio's multi-thread runtime it is mostly the eventfd
# that wakes a parked worker, not the socket.
SENDS = {"writev", "sendto", "sendmsg", "sendmmsg"}
PLAIN_WRITES = {"write", "pwrite64"}
READS = {"read", "readv", "recvfrom", "recvmsg", "recvmmsg", "pread64"}
WAITS = {"epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select", "pselect6"}
WAKES = {"futex"}


def parse_strace(path):
    counts = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 5 or not parts[0][0].isdigit() or parts[-1] == "total":
                    continue
                try:
                    counts[parts[-1]] = int(parts[3])
                except ValueError:
                    continue
    except OSError:
        pass
    return counts


def parse_perf(path):
    """perf stat -x, output: count,unit,event,... per line; syscalls:sys_enter_NAME -> NAME.
    raw_syscalls:sys_enter (every syscall) becomes "all"."""
    counts = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(",")
                if len(parts) < 3 or not parts[0].isdigit():
                    continue
                event = parts[2]
                name = "all" if event == "raw_syscalls:sys_enter" else event.split("sys_enter_")[-1]
                counts[name] = int(parts[0])
    except OSError:
        pass
    return counts


def strace(label, impl, calls, client_path, server_path, parse=None, tool="strace"):
    calls = int(calls)
    out = {"label": label, "impl": impl, "calls": calls, "tool": tool}
    for side, path in (("client", client_path), ("server", server_path)):
        c = (parse or parse_strace)(path)
        total = c.pop("all", None)
        per = lambda names: round(sum(v for k, v in c.items() if k in names) / calls, 2)
        out[side] = {
            "syscalls_per_call": round((total if total is not None else sum(c.values())) / calls, 2),
            "socket_sends_per_call": per(SENDS),
            "write_per_call": per(PLAIN_WRITES),
            "reads_per_call": per(READS),
            "waits_per_call": per(WAITS),
            "futex_per_call": per(WAKES),
            "top": sorted(c.items(), key=lambda kv: -kv[1])[:6],
        }
    print(json.dumps(out))


def perf(label, impl, calls, client_path, server_path):
    strace(label, impl, calls, client_path, server_path, parse_perf, "perf")


def syscalls(path):
    runs = []
    with open(path) as f:
        runs = [json.loads(l) for l in f if l.strip()]
    print()
    print("| counted by | setting | impl | side | syscalls/call | socket sends/call | write(2)/call | "
          "reads/call | epoll waits/call | futex/call |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        for side in ("client", "server"):
            s = r[side]
            print(f"| {r.get('tool', 'strace')} | {SETTINGS.get(r['label'], r['label'])} | {IMPL_NAMES.get(r['impl'], r['impl'])} "
                  f"| {side} | {s['syscalls_per_call']} | {s['socket_sends_per_call']} | "
                  f"{s['write_per_call']} | "
                  f"{s['reads_per_call']} | {s['waits_per_call']} | {s['futex_per_call']} |")


def cpu_count():
    import os
    return os.cpu_count()


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"compare": compare, "before": before, "features": features, "strace": strace, "perf": perf,
     "syscalls": syscalls, "runtimes": runtimes, "walk": walk,
     "timeline": timeline, "copied": copied, "copies": copies}[cmd](*args)
