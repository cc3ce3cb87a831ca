"""``python -m glassroom.fleet NAME [--cpus N] [--tiers a,b]``: this host's Ray resources.

Prints the JSON for ``ray start --resources`` that makes this host node NAME
of the fleet, with the tiers that work here (probed as ``glassroom doctor``
does, or given) and its sandbox CPUs (default: 4 per core: sandboxes mostly
wait on their agents)::

    ray start --address HEAD:6379 --resources "$(python -m glassroom.fleet gpu-07)"
"""

from __future__ import annotations

import argparse
import json
import os

from ._ray import check_name, node_resources, probe_tiers


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m glassroom.fleet")
    ap.add_argument("name", type=check_name, help="the node's stable name (its data dir's)")
    ap.add_argument("--cpus", type=float, default=4.0 * (os.cpu_count() or 1))
    ap.add_argument("--tiers", help="comma-separated; default: the tiers that work here")
    ap.add_argument(
        "--templates", default="", help="comma-separated templates only some hosts have"
    )
    ns = ap.parse_args()
    tiers = ns.tiers.split(",") if ns.tiers else probe_tiers()
    templates = [t for t in ns.templates.split(",") if t]
    print(json.dumps(node_resources(ns.name, tiers, ns.cpus, templates)))


if __name__ == "__main__":
    main()
