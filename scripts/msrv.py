#!/usr/bin/env python3
"""Prints the packages in Cargo.lock with the highest `rust-version`, read from their manifests in
~/.cargo/registry/src (run any cargo build first so that the sources are there). The workspace's
`rust-version` must be at least the first line's.

    python3 scripts/msrv.py        # the 10 highest
    python3 scripts/msrv.py 30     # the 30 highest
"""
import glob
import os
import sys
import tomllib

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
with open(os.path.join(root, "Cargo.lock"), "rb") as f:
    locked = tomllib.load(f)["package"]
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
for _, name, version, rust_version in rows[: int(sys.argv[1]) if len(sys.argv) > 1 else 10]:
    print(f"{rust_version:8} {name} {version}")
if missing:
    print(f"no source found (build first): {', '.join(missing)}", file=sys.stderr)
