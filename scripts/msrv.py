#!/usr/bin/env python3
"""Prints the dependencies with the highest `rust-version`, read from their manifests in
~/.cargo/registry/src (run `cargo fetch` first so that the sources are there). The published
crates' `rust-version` must be at least the first line's for their own trees.

    python3 scripts/msrv.py                 # the 10 highest of all Cargo.lock (tests included)
    python3 scripts/msrv.py amqp-rpc-core   # the 10 highest of one crate's normal and build
                                            # dependencies, every feature on
"""
import glob
import os
import subprocess
import sys
import tomllib

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
with open(os.path.join(root, "Cargo.lock"), "rb") as f:
    locked = tomllib.load(f)["package"]
if len(sys.argv) > 1:
    tree = subprocess.run(
        ["cargo", "tree", "-p", sys.argv[1], "--all-features", "-e", "normal,build",
         "--prefix", "none", "--no-dedupe"],
        cwd=root, check=True, capture_output=True, text=True).stdout
    wanted = {tuple(line.split()[:2]) for line in tree.splitlines() if line.strip()}
    locked = [p for p in locked if (p["name"], "v" + p["version"]) in wanted]
registries = glob.glob(os.path.expanduser("~/.cargo/registry/src/*/"))

rows, missing = [], []
for package in locked:
    if "source" not in package:
        continue  # a workspace member
    name, version = package["name"], package["version"]
    for registry in registries:
        manifest = os.path.join(registry, f"{name}-{version}", "Cargo.toml")
        if os.path.exists(manifest):
            with open(manifest, "rb") as f:
                rust_version = tomllib.load(f).get("package", {}).get("rust-version")
            # Workspace-inherited values are resolved in published manifests; a dict here would be
            # a git dependency's raw manifest, which we treat as unknown.
            if isinstance(rust_version, str):
                key = tuple(int(x) for x in rust_version.split("."))
                rows.append((key, name, version, rust_version))
            break
    else:
        missing.append(f"{name} {version}")

rows.sort(reverse=True)
for _, name, version, rust_version in rows[:10]:
    print(f"{rust_version:8} {name} {version}")
if missing:
    print(f"no source found (build first): {', '.join(missing)}", file=sys.stderr)
