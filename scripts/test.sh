#!/usr/bin/env bash
# Runs every test of the workspace against a local RabbitMQ (started or installed if needed).
# Extra arguments go to both cargo test runs, e.g. `scripts/test.sh -- --nocapture`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/ensure-rabbitmq.sh

log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --all-targets "$@" 2>&1 | tee "$log"
# --all-targets leaves out doctests; run them too.
cargo test --workspace --doc "$@" 2>&1 | tee -a "$log"

# One total over every test binary, as the last line (the last binary alone may have run none).
awk '/^test result:/ { p += $4; f += $6; i += $8 }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
