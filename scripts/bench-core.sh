#!/usr/bin/env bash
# The core's CPU cost per call, no I/O (criterion, core/benches/per_call.rs): encode a request,
# handle a reply, decode a delivery, serve a request, against amq-protocol's own parser and
# encoder on the same frames. Prints the medians as a markdown table and JSON lines.
#   scripts/bench-core.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench -q -p amqp-rpc-core --bench per_call >&2
python3 - "${CARGO_TARGET_DIR:-target}/criterion/per call" <<'PY'
import json, os, sys
root = sys.argv[1]
rows = []
for name in sorted(os.listdir(root)):
    path = os.path.join(root, name, "new", "estimates.json")
    if not os.path.exists(path):
        continue
    est = json.load(open(path))["median"]
    ci = est["confidence_interval"]
    # criterion replaces ':' and '::' in directory names; show the benchmark's own name.
    title = name.replace("_ ", ": ").replace("Event__Delivery", "Event::Delivery")
    rows.append((title, est["point_estimate"], ci["lower_bound"], ci["upper_bound"]))
for title, med, lo, hi in rows:
    print(json.dumps({"bench": title, "median_ns": round(med), "ci95_ns": [round(lo), round(hi)]}))
print()
print("| per call, core only | median | 95% CI |")
print("|---|---:|---:|")
for title, med, lo, hi in rows:
    print(f"| {title} | {med / 1000:.2f} µs | {lo / 1000:.2f}-{hi / 1000:.2f} µs |")
PY
