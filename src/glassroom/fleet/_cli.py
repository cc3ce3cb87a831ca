"""``glassroom audit verify --fleet`` and ``audit show --fleet``: the CLI's fleet side.

Apart from ``interfaces/cli.py`` so that the CLI imports nothing of Ray
unless ``--fleet`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys


def _address(ns: argparse.Namespace) -> str | None:
    addr: str | None = getattr(ns, "ray", None)
    if not addr:
        print("glassroom: --fleet needs --ray ADDRESS (the cluster's GCS address)",
              file=sys.stderr)  # fmt: skip
    return addr


def audit_verify(ns: argparse.Namespace) -> int:
    from ._audit import verify_fleet

    addr = _address(ns)
    if addr is None:
        return 125
    report = verify_fleet(addr, anchor_log=getattr(ns, "anchor_log", None))
    if ns.json:
        print(json.dumps(report))
        return 0 if report["ok"] else 1
    for n in report["nodes"]:
        if n.get("ok"):
            print(f"{n['node']}: ok, {n['records']} records, head seq {n['seq']} "
                  f"{str(n['hash'])[:16]}…; anchor: {n.get('anchor_status')}")  # fmt: skip
        else:
            print(f"{n['node']}: FAILED")
            for p in n.get("problems", []):
                print(f"  {p}")
    for p in report["problems"]:
        print(f"fleet: {p}")
    central = report.get("central")
    if central:
        state = "ok" if central["ok"] else "FAILED"
        print(f"front door log {central['log']}: {state}, {central['records']} records; "
              "the heads above are anchored in it")  # fmt: skip
    print("fleet: ok" if report["ok"] else "fleet: FAILED")
    return 0 if report["ok"] else 1


def audit_show(ns: argparse.Namespace) -> int:
    from ..audit import format_table
    from ._audit import show_fleet

    addr = _address(ns)
    if addr is None:
        return 125
    recs = show_fleet(addr)
    if ns.json:
        for r in recs:
            sys.stdout.write(json.dumps(r, sort_keys=True) + "\n")
        return 0
    by_node: dict[str, list[dict[str, object]]] = {}
    for r in recs:
        by_node.setdefault(str(r["node"]), []).append(r)
    for node, rs in sorted(by_node.items()):
        print(f"== node {node}")
        print(format_table([{k: v for k, v in r.items() if k != "node"} for r in rs]))
    return 0
