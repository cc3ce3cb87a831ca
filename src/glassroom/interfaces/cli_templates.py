"""``glassroom template import|build|builtin|list|show|verify|rm``: the local template store.

Kept apart from cli.py so the store's commands (and their imports) cost
nothing to the commands that do not use them.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

PROG = "glassroom"


def add_parser(sub: Any) -> None:
    t = sub.add_parser("template", help="templates: read-only root filesystems (docs/templates.md)")
    ts = t.add_subparsers(dest="template_cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", metavar="DIR",
                        help="the template store (default: $GLASSROOM_TEMPLATE_DIR, "
                             "or beside the audit log)")  # fmt: skip
    common.add_argument("--json", action="store_true")
    ti = ts.add_parser("import", parents=[common],
                       help="an OCI image layout (dir or tar) or a docker save tar")
    ti.add_argument("image")
    ti.add_argument("--name", required=True, help="the template's name")
    ti.add_argument("--ref", help="which image in it: a ref name (OCI) or REPO:TAG (docker save)")
    tb = ts.add_parser("build", parents=[common],
                       help="from a recipe: *.toml or a Dockerfile subset (RUN in a sandbox)")
    tb.add_argument("recipe")
    tb.add_argument("--name", required=True, help="the template's name")
    tbi = ts.add_parser("builtin", parents=[common],
                        help="build the built-in templates (base, code-interpreter) unless current")
    tbi.add_argument("names", nargs="*", help="which (default: all)")
    tbi.add_argument("--rebuild", action="store_true", help="even when current")
    ts.add_parser("list", parents=[common], help="every named template")
    for verb, text in (("show", "one template's metadata"),
                       ("verify", "recompute the tree's digest"),
                       ("rm", "drop a name (its tree goes with the last name)")):  # fmt: skip
        tv = ts.add_parser(verb, parents=[common], help=text)
        tv.add_argument("name")
    t.set_defaults(func=cmd_template)


def _facts(t: Any) -> dict[str, Any]:
    m = t.meta
    return {"name": t.name, "digest": m.digest, "files": m.files, "size_bytes": m.size_bytes,
            "env": m.env, "workdir": m.workdir, "user": m.user, "entrypoint": m.entrypoint,
            "cmd": m.cmd, "source": m.source, "dropped": m.dropped, "created": m.created,
            "rootfs": str(t.rootfs)}  # fmt: skip


def _line(t: Any) -> str:
    mib = t.meta.size_bytes / (1 << 20)
    kind = t.meta.source.get("kind", "?")
    return f"{t.name:<24} {t.digest[:19]}  {t.meta.files:>7} files  {mib:8.1f} MiB  {kind}"


def cmd_template(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from ..templates import TemplateStore, import_oci

    store = TemplateStore(Path(ns.dir) if ns.dir else None)
    verb = ns.template_cmd
    if verb == "import":
        def progress(label: str) -> None:
            if not ns.json:
                print(f"{PROG}: template {ns.name}: unpacking {label}", file=sys.stderr)

        t = import_oci(ns.image, store, ns.name, ref=ns.ref, progress=progress)
        print(json.dumps(_facts(t), indent=2) if ns.json else _line(t))
        return 0
    if verb == "build":
        from ..templates import build, load_recipe

        def said(msg: str) -> None:
            if not ns.json:
                for line in msg.splitlines()[-20:]:
                    print(f"{PROG}: template {ns.name}: {line}", file=sys.stderr)

        t = build(load_recipe(ns.recipe), store, ns.name, progress=said)
        print(json.dumps(_facts(t), indent=2) if ns.json else _line(t))
        return 0
    if verb == "builtin":
        import time

        from ..templates import BUILTINS, ensure

        def told(msg: str) -> None:
            if not ns.json:
                for line in msg.splitlines()[-20:]:
                    print(f"{PROG}: template builtin: {line}", file=sys.stderr)

        t0 = time.monotonic()
        done = ensure(store, tuple(ns.names) or BUILTINS, rebuild=ns.rebuild, progress=told)
        took = round(time.monotonic() - t0, 1)
        if ns.json:
            print(json.dumps({"templates": [{**_facts(t), "built": b} for t, b in done],
                              "seconds": took}, indent=2))  # fmt: skip
        else:
            for t, b in done:
                print(_line(t) + ("  (built)" if b else "  (current)"))
            print(f"{took} s")
        return 0
    if verb == "list":
        items = store.list()
        if ns.json:
            print(json.dumps([_facts(t) for t in items], indent=2))
        else:
            for t in items:
                print(_line(t))
            if not items:
                print(f"no templates in {store.root}")
        return 0
    if verb == "rm":
        if not store.remove(ns.name):
            store.get(ns.name)  # raises TemplateError: not found, with the known names
        print(json.dumps({"removed": ns.name}) if ns.json else f"removed {ns.name}")
        return 0
    t = store.verify(ns.name) if verb == "verify" else store.get(ns.name)
    if ns.json:
        print(json.dumps(_facts(t), indent=2))
    elif verb == "verify":
        print(f"{ns.name}: ok ({t.digest}, {t.meta.files} files)")
    else:
        for k, v in _facts(t).items():
            print(f"{k:<11} {v}")
    return 0
