#!/usr/bin/env bash
# Runs every test of the workspace against a local RabbitMQ (started or installed if needed).
# Extra arguments go to both cargo test runs, e.g. `scripts/test.sh -- --nocapture`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/ensure-rabbitmq.sh
cargo test --workspace --all-targets "$@"
# --all-targets leaves out doctests; run them too.
cargo test --workspace --doc "$@"
