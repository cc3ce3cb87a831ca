"""``glassroom``: the single command-line entry point.

Exit status: a command's own status for ``run``; 125 whenever glassroom
itself refused or failed, with one line on stderr naming the rule or the
missing capability (so 125 is never confused with the command's status).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .._errors import REFUSED_EXIT, GlassroomError, PlanError, PolicyError, SnapshotError

if TYPE_CHECKING:
    from .._sandbox import Sandbox
    from ..lifecycle.snapshots import SnapshotInfo, SnapshotStore

PROG = "glassroom"


def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return REFUSED_EXIT


def _load(policy: str | None) -> Any:
    from ..policy import default_policy, load_policy

    return load_policy(policy) if policy else default_policy()


def _located(exc: GlassroomError, policy_file: str | None) -> GlassroomError:
    """Give a compile-time refusal the policy file's name and the rule's line."""
    from ..policy._load import rule_line

    if not policy_file or not exc.rule or isinstance(exc, PolicyError):
        return exc
    try:
        line = rule_line(Path(policy_file).read_text(), exc.rule)
    except OSError:
        return exc
    where = f"{policy_file}:{line}" if line else policy_file
    exc.message = f"{where}: {exc.message}"
    return exc


def cmd_run(ns: argparse.Namespace) -> int:
    try:
        return _run(ns)
    except PlanError as exc:
        raise _located(exc, ns.policy) from None


def _run(ns: argparse.Namespace) -> int:
    argv = list(ns.cmd)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        return _fail("run: no command given (usage: glassroom run [options] -- CMD [ARG...])")
    if ns.from_snapshot is not None and ns.policy:
        # A restore must be built under exactly the walls it was saved with.
        return _fail("run: --policy and --from-snapshot cannot be used together (a snapshot "
                     "is restored under the policy it was made with)")  # fmt: skip
    if ns.out_path and not ns.out:
        return _fail("run: --out-path needs --out DIR (where to copy it)")
    if ns.out:
        # Checked before the task runs: its results must have somewhere to go.
        out = Path(ns.out)
        if out.exists() and (not out.is_dir() or out.is_symlink() or any(out.iterdir())):
            return _fail(f"run: --out {out}: must be a new or empty directory "
                         "(results are never written over host files)")  # fmt: skip
    try:
        made = _run_sandbox(ns)
    except SnapshotError as exc:
        return _snapshot_fail(f"run --from-snapshot {ns.from_snapshot}", exc)
    with made as sb:
        if ns.workspace:
            sb.copy_in(ns.workspace)
        res = sb.run(argv, timeout_s=ns.timeout)
        copied = sb.copy_out(ns.out, ns.out_path) if ns.out else None
        if copied is not None:
            for path, why in copied.refused:
                print(f"{PROG}: --out: left {path} behind: {why}", file=sys.stderr)
        if ns.json:
            print(json.dumps({
                "sandbox_id": sb.id,
                "backend": sb.backend,
                "exit_code": res.exit_code,
                "stdout": res.stdout,
                "stderr": res.stderr,
                "duration_ms": round(res.duration_ms, 3),
                "truncated": res.truncated,
                "blocked": [b.as_dict() for b in res.blocked],
                **({"out": copied.as_dict()} if copied is not None else {}),
            }))  # fmt: skip
        else:
            sys.stdout.buffer.write(res.stdout_bytes)
            sys.stdout.flush()
            sys.stderr.buffer.write(res.stderr_bytes)
            for b in res.blocked:
                print(f"{PROG}: blocked {b.action} {b.target} (rule {b.rule})", file=sys.stderr)
    return res.exit_code


def _run_sandbox(ns: argparse.Namespace) -> Sandbox:
    """The run's sandbox: fresh from the policy, or made from a snapshot (which
    carries its own policy and tier, so ``_run`` refuses a ``--policy`` beside
    it, and a ``--backend`` must be that tier).

    Any tenant's snapshot: the local store is the operator's, as ``glassroom
    snapshot list`` shows it whole."""
    from .._sandbox import Sandbox

    if ns.from_snapshot is None:
        return Sandbox(_load(ns.policy), backend=ns.backend, audit_log=ns.audit_log)
    return Sandbox.from_snapshot(
        ns.from_snapshot,
        store=_store(ns.snapshot_dir),
        tenant=None,
        audit_log=ns.audit_log,
        backend=ns.backend,
    )


def _store(directory: str | None) -> SnapshotStore:
    """The local snapshot store: ``directory``, or the SDK's default
    (``$GLASSROOM_SNAPSHOT_DIR``, or /var/lib/glassroom/snapshots as root)."""
    from ..lifecycle.snapshots import SnapshotStore, default_store

    return SnapshotStore(Path(directory)) if directory else default_store()


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _when(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _snapshot_line(info: SnapshotInfo) -> str:
    names = ",".join(info.names) or "-"
    saved = "memory+files" if info.memory else "files only"
    return (f"{info.id}  {names}  {info.tenant}  {info.tier}  {saved}  "
            f"{_human_size(info.size_bytes)}  {_when(info.created_at)}  "
            f"from {info.sandbox_id}")  # fmt: skip


def _snapshot_detail(info: SnapshotInfo) -> str:
    """``show``: every field, the time readable, and why memory was not saved."""
    d = info.as_dict()
    d["created_at"] = _when(info.created_at)
    d["names"] = ", ".join(info.names) or "-"
    d["size_bytes"] = f"{info.size_bytes} ({_human_size(info.size_bytes)})"
    if d["memory_refused"] is None:
        del d["memory_refused"]
    return "\n".join(f"{k}: {v}" for k, v in d.items())


def _snapshot_fail(what: str, exc: SnapshotError) -> int:
    """One line naming the rule: a changed snapshot (``snapshot.integrity``) must
    not read like a missing one (``snapshot.not_found``)."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return _fail(f"{what}: {first}" + (f" (rule {exc.rule})" if exc.rule else ""))


def cmd_snapshot(ns: argparse.Namespace) -> int:
    """``snapshot list|show ID|rm ID|verify ID`` over the local store."""
    try:
        return _snapshot_cmd(ns)
    except SnapshotError as exc:
        where = f" {ns.id}" if getattr(ns, "id", None) else ""
        return _snapshot_fail(f"snapshot {ns.snapshot_cmd}{where}", exc)


def _snapshot_cmd(ns: argparse.Namespace) -> int:
    store = _store(ns.dir)
    verb = ns.snapshot_cmd
    if verb == "list":
        items = store.list(sandbox_id=ns.sandbox, name=ns.name)
        if ns.json:
            print(json.dumps([i.as_dict() for i in items], indent=2))
        else:
            for i in items:
                print(_snapshot_line(i))
            if not items:
                print(f"no snapshots in {store.root}")
        return 0
    if verb == "rm":
        store.get(ns.id)  # a missing id: SnapshotError (snapshot.not_found), exit 125
        store.delete(ns.id)
        if ns.json:
            print(json.dumps({"id": ns.id, "deleted": True}))
        else:
            print(f"{ns.id}: deleted")
        return 0
    info = store.verify(ns.id) if verb == "verify" else store.get(ns.id)
    if ns.json:
        out = info.as_dict()
        if verb == "verify":
            out = {"ok": True, **out}
        print(json.dumps(out, indent=2))
    elif verb == "verify":
        print(f"{ns.id}: ok, signature and every file hash match")
    else:
        print(_snapshot_detail(info))
    return 0


def cmd_policy_check(ns: argparse.Namespace) -> int:
    from ..policy import compile as compile_policy
    from ..policy import load_policy

    policy = load_policy(ns.file)
    try:
        plan = compile_policy(policy, ns.backend)
    except PlanError as exc:
        raise _located(exc, ns.file) from None
    print(
        f"{ns.file}: ok (risk {policy.risk} -> backend {plan.backend}; "
        f"{len(policy.filesystem.read)} read, {len(policy.filesystem.write)} write paths; "
        f"{len(plan.tools)} tools; network {'none' if not policy.network.allow else 'allowlist'})"
    )
    return 0


def cmd_audit_verify(ns: argparse.Namespace) -> int:
    from .. import _config
    from ..audit import verify

    if ns.fleet:
        from ..fleet._cli import audit_verify

        return audit_verify(ns)
    path = Path(ns.log or _config.audit_log_path())
    res = verify(path, pubkey=ns.pubkey)
    if ns.json:
        print(json.dumps({"ok": res.ok, "records": res.records, "problems": res.problems,
                          "last_seq": res.last_seq, "anchored_seq": res.anchored_seq,
                          "anchor": res.anchor_status}))  # fmt: skip
        return 0 if res.ok else 1
    if res.ok:
        print(f"{path}: ok, {res.records} records, chain intact (last seq {res.last_seq})")
    else:
        print(f"{path}: FAILED, {len(res.problems)} problem(s) in {res.records} records")
        for p in res.problems:
            print(f"  {p}")
    print(f"anchor: {res.anchor_status}")
    return 0 if res.ok else 1


def cmd_audit_show(ns: argparse.Namespace) -> int:
    from .. import _config
    from ..audit import format_table, format_timeline, read_records, select
    from ..audit._log import canonical_json

    if ns.fleet:
        from ..fleet._cli import audit_show

        return audit_show(ns)
    path = Path(ns.log or _config.audit_log_path())
    recs = select(read_records(path), sandbox=ns.sandbox, blocked=ns.blocked, types=ns.type)
    if ns.json:
        # JSONL as stored: a record's canonical JSON is its line in the file, byte for byte.
        for r in recs:
            sys.stdout.write(canonical_json(r).decode("ascii") + "\n")
    elif ns.timeline:
        print(format_timeline(recs))
    else:
        print(format_table(recs))
    return 0


def cmd_doctor(ns: argparse.Namespace) -> int:
    from .doctor import render, report

    rep = report()
    print(json.dumps(rep, indent=2) if ns.json else render(rep))
    return 0


def cmd_drill(ns: argparse.Namespace) -> int:
    from ..drill import render, run_drill

    results = run_drill(backend=ns.backend, audit_log=ns.audit_log)
    if ns.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        print(render(results))
    return 0 if all(r.passed for r in results) else 1


def cmd_microvm(ns: argparse.Namespace) -> int:
    """``microvm prepare``: kernel, initramfs, root image and snapshot, cached."""
    from ..backends.microvm.prepare import prepare

    print(json.dumps(prepare(snapshot=not ns.no_snapshot), indent=2))
    return 0


def cmd_init(ns: argparse.Namespace) -> int:
    """``init build``: compile the in-sandbox init (docs/operations.md), or say where it is."""
    from .. import _config
    from .._sys import agent_build

    state = _config.state_dir()
    found = agent_build.find(state)
    if ns.init_cmd == "build":  # into the build dir, which outlives a reboot
        try:
            found = agent_build.build()
        except agent_build.BuildError as exc:
            return _fail(f"init build: {exc}")
    print(json.dumps({"compiled": str(found) if found else None,
                      "source_digest": agent_build.source_digest(),
                      "selected_by": "GLASSROOM_INIT=auto|compiled|python"}, indent=2))  # fmt: skip
    return 0 if found else 1


def cmd_approvals(ns: argparse.Namespace) -> int:
    """``approvals list|allow|deny ID``: decide requests held by ``network.ask``."""
    from ..egress import _approvals

    if ns.approvals_cmd == "list":
        items = [a.as_dict() for a in _approvals.pending()]
        if ns.json:
            print(json.dumps(items, indent=2))
        else:
            for a in items:
                what = f"{a['method'] or 'CONNECT'} {a['host']}:{a['port']}{a['path'] or ''}"
                print(f"{a['id']}  {a['sandbox']}  {what}  rule={a['rule']}")
            if not items:
                print("no pending approvals")
        return 0
    rec = _approvals.decide(ns.id, ns.approvals_cmd)
    print(f"{ns.id}: {rec['decision']} (by {rec['by']})")
    return 0 if rec["decision"] == ns.approvals_cmd else 1


def _serve_config(ns: argparse.Namespace) -> Any:
    from .http import ServeConfig

    cfg = ServeConfig.load(ns.config) if ns.config else ServeConfig()
    if ns.host:
        cfg.host = ns.host
    if ns.port:
        cfg.port = ns.port
    if ns.data_dir:
        cfg.data_dir = Path(ns.data_dir)
    key = os.environ.get("GLASSROOM_API_KEY")
    if key:  # a single-tenant shortcut for local use: the key itself, from the environment
        cfg.add_key(os.environ.get("GLASSROOM_TENANT", "default"), key)
    return cfg


def cmd_serve(ns: argparse.Namespace) -> int:
    from .http import hash_key, new_key, serve

    if ns.new_key:
        key = new_key()
        print(f"key: {key}")
        print(f'[tenants.{ns.new_key}]\napi_keys_sha256 = ["{hash_key(key)}"]')
        return 0
    cfg = _serve_config(ns)
    if not cfg.key_hashes:
        return _fail("serve: no API keys (add [tenants.NAME] api_keys_sha256 to --config, "
                     "or set GLASSROOM_API_KEY)")  # fmt: skip
    if ns.ray:  # the front door of a fleet (docs/operations.md, "The fleet")
        from ..fleet._serve import run as run_fleet

        run_fleet(cfg, ns.ray)
        return 0
    serve(cfg)
    return 0


def cmd_mcp(ns: argparse.Namespace) -> int:
    from .http._config import check_mcp_cap
    from .mcp import check_http_bind, check_idle_ttl, run_http, run_stdio

    try:
        ttl = check_idle_ttl(ns.idle_ttl)
    except ValueError as exc:
        return _fail(f"mcp: --idle-ttl: {exc}")
    cfg = _serve_config(ns)
    for flag, name in (("--max-sandboxes-per-session", "max_sandboxes_per_session"),
                       ("--max-handle-sandboxes", "max_handle_sandboxes")):  # fmt: skip
        value = getattr(ns, name)
        if value is not None:
            try:
                setattr(cfg, name, check_mcp_cap(value, name, flag))
            except PolicyError as exc:
                return _fail(f"mcp: {exc}")
    if ns.http:
        host = ns.host or "127.0.0.1"
        try:  # no keys: loopback only, refused before anything starts
            check_http_bind(cfg, host)
        except ValueError as exc:
            return _fail(f"mcp --http: {exc}")
        run_http(cfg, host=host, port=ns.port or 8050, idle_ttl_s=ttl)
    else:
        run_stdio(cfg, idle_ttl_s=ttl)
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(audit_log=ns.audit_log)


def _add_run(sub: Any) -> None:
    r = sub.add_parser("run", help="run one command in a fresh sandbox")
    r.add_argument("--policy", help="policy TOML file (default: the built-in strict policy)")
    r.add_argument(
        "--backend", help="namespaces | gvisor | microvm (default: from the policy's risk)"
    )
    r.add_argument("--json", action="store_true", help="print a JSON result")
    r.add_argument("--timeout", type=float, default=None, help="per-command timeout in seconds")
    r.add_argument(
        "--from-snapshot",
        metavar="ID",
        help="start the sandbox from this snapshot (under its own policy)",
    )
    r.add_argument(
        "--snapshot-dir",
        metavar="DIR",
        help="the snapshot store (default: $GLASSROOM_SNAPSHOT_DIR or the system one)",
    )
    r.add_argument("--workspace", metavar="DIR",
                   help="copy this host dir into /workspace first (no symlinks or special files)")
    r.add_argument("--out", metavar="DIR",
                   help="at the end, copy /workspace out to this new or empty host dir")
    r.add_argument("--out-path", metavar="PATH", action="append", default=None,
                   help="with --out: copy only this path under /workspace (repeatable)")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")
    r.set_defaults(func=cmd_run)


def _add_template(sub: Any) -> None:
    from . import cli_templates

    cli_templates.add_parser(sub)


def _add_snapshot(sub: Any) -> None:
    sn = sub.add_parser("snapshot", help="the local snapshot store (docs/snapshots.md)")
    sns = sn.add_subparsers(dest="snapshot_cmd", required=True)
    snl = sns.add_parser("list", help="every snapshot in the store")
    snl.add_argument("--sandbox", help="only the snapshots of this sandbox id")
    snl.add_argument("--name", help="only the snapshots with this name")
    for verb, text in (("show", "one snapshot's manifest facts"),
                       ("rm", "delete a snapshot"),
                       ("verify", "check the signature and every file's hash")):  # fmt: skip
        sv = sns.add_parser(verb, help=text)
        sv.add_argument("id")
    for sv in (snl, *(sns.choices[v] for v in ("show", "rm", "verify"))):
        sv.add_argument("--dir", metavar="DIR",
                        help="the snapshot store (default: $GLASSROOM_SNAPSHOT_DIR or the "
                             "system one)")  # fmt: skip
        sv.add_argument("--json", action="store_true")
        sv.set_defaults(func=cmd_snapshot)


def _add_policy(sub: Any) -> None:
    pol = sub.add_parser("policy", help="policy tools").add_subparsers(
        dest="policy_cmd", required=True
    )
    pc = pol.add_parser("check", help="validate a policy file and compile it")
    pc.add_argument("file")
    pc.add_argument("--backend")
    pc.set_defaults(func=cmd_policy_check)


def _add_audit(sub: Any) -> None:
    au = sub.add_parser("audit", help="the audit log").add_subparsers(
        dest="audit_cmd", required=True
    )
    av = au.add_parser("verify", help="check the hash chain; names every broken record")
    av.add_argument("log", nargs="?")
    av.add_argument("--json", action="store_true")
    av.add_argument("--pubkey", metavar="FILE",
                    help="anchor public key (PEM or raw; default: audit-anchor.pub "
                         "beside the anchor key)")  # fmt: skip
    av.set_defaults(func=cmd_audit_verify)
    av.add_argument("--anchor-log", metavar="FILE",
                    help="--fleet: the front door's audit log: check the heads it anchored, "
                         "anchor the new ones")  # fmt: skip
    ash = au.add_parser("show", help="print records")
    ash.add_argument("log", nargs="?")
    ash.add_argument("--sandbox", help="a sandbox id or a prefix of it")
    ash.add_argument("--type", action="append", choices=("file", "exec", "net"),
                     help="file accesses, execs/commands, network; repeatable")  # fmt: skip
    ash.add_argument("--blocked", action="store_true", help="only denied records")
    how = ash.add_mutually_exclusive_group()
    how.add_argument("--json", action="store_true", help="JSONL, one record per line as stored")
    how.add_argument("--timeline", action="store_true",
                     help="per sandbox: time offset, allowed/denied, op, path, result")  # fmt: skip
    ash.set_defaults(func=cmd_audit_show)
    for sp in (av, ash):
        sp.add_argument("--fleet", action="store_true",
                        help="every node of the fleet (with --ray ADDRESS)")  # fmt: skip
        sp.add_argument("--ray", metavar="ADDRESS", help="the Ray cluster of the fleet")


def _add_doctor(sub: Any) -> None:
    d = sub.add_parser("doctor", help="what this host supports")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_doctor)


def _add_drill(sub: Any) -> None:
    dr = sub.add_parser("drill", help="try every escape; each beside its harmless twin")
    dr.add_argument("--backend")
    dr.add_argument("--json", action="store_true")
    dr.set_defaults(func=cmd_drill)


def _add_microvm(sub: Any) -> None:
    mv = sub.add_parser("microvm", help="the microvm tier's guest kernel and images")
    mvs = mv.add_subparsers(dest="microvm_cmd", required=True)
    mvp = mvs.add_parser("prepare", help="fetch the guest kernel, build and cache the images")
    mvp.add_argument("--no-snapshot", action="store_true", help="skip the booted-idle snapshot")
    mvp.set_defaults(func=cmd_microvm)


def _add_init(sub: Any) -> None:
    it = sub.add_parser("init", help="the compiled in-sandbox init (namespaces and gvisor tiers)")
    its = it.add_subparsers(dest="init_cmd", required=True)
    its.add_parser("build", help="compile it into the build dir (a no-op when current)")
    its.add_parser("status", help="where the current build is, if any (exit 1: none)")
    it.set_defaults(func=cmd_init)


def _add_demo(sub: Any) -> None:
    de = sub.add_parser(
        "demo", help="a demo agent task: real work, one blocked action, the audit trail"
    )
    de.set_defaults(func=cmd_demo)


def _add_approvals(sub: Any) -> None:
    ap = sub.add_parser("approvals", help="network requests held for a decision (network.ask)")
    aps = ap.add_subparsers(dest="approvals_cmd", required=True)
    apl = aps.add_parser("list", help="pending requests")
    apl.add_argument("--json", action="store_true")
    apl.set_defaults(func=cmd_approvals)
    for verb in ("allow", "deny"):
        apv = aps.add_parser(verb, help=f"{verb} a held request")
        apv.add_argument("id")
        apv.set_defaults(func=cmd_approvals)


_SERVERS = (
    ("serve", cmd_serve, "HTTP API (own /v1 + E2B-compatible) for sandboxes"),
    ("mcp", cmd_mcp, "MCP server (stdio; --http for streamable HTTP)"),
)


_SERVER_NAMES = frozenset(name for name, _, _ in _SERVERS)


def _add_servers(sub: Any, names: tuple[str, ...] = ("serve", "mcp")) -> None:
    for name, func, text in _SERVERS:
        if name not in names:
            continue
        sp = sub.add_parser(name, help=text)
        sp.add_argument("--config", help="TOML: host, port, data_dir, tenants, templates")
        sp.add_argument("--host", help="listen address (default 127.0.0.1)")
        sp.add_argument("--port", type=int, help="listen port")
        sp.add_argument("--data-dir", help="where the server keeps its audit log")
        if name == "serve":
            sp.add_argument(
                "--new-key",
                metavar="TENANT",
                help="print a new API key and its config line, then exit",
            )
            sp.add_argument("--ray", metavar="ADDRESS",
                            help="be the front door of the fleet on this Ray cluster")  # fmt: skip
        else:
            sp.add_argument("--http", action="store_true", help="streamable HTTP, not stdio")
            sp.add_argument("--idle-ttl", type=float, default=600.0, metavar="SECONDS",
                            help="destroy a sandbox no tool call has named for this long "
                                 "(default 600)")  # fmt: skip
            sp.add_argument("--max-sandboxes-per-session", type=int, metavar="N",
                            help="live sandboxes one MCP session may hold (default 10; "
                                 "config: max_sandboxes_per_session)")  # fmt: skip
            sp.add_argument("--max-handle-sandboxes", type=int, metavar="N",
                            help="live sandboxes the session-less (handle) clients of one "
                                 "tenant may hold (default 20; config: "
                                 "max_handle_sandboxes)")  # fmt: skip
        sp.set_defaults(func=func)


#: Each command's subparser, in ``--help``'s order.
_COMMANDS: dict[str, Callable[[Any], None]] = {
    "run": _add_run,
    "template": _add_template,
    "snapshot": _add_snapshot,
    "policy": _add_policy,
    "audit": _add_audit,
    "doctor": _add_doctor,
    "drill": _add_drill,
    "microvm": _add_microvm,
    "init": _add_init,
    "demo": _add_demo,
    "approvals": _add_approvals,
    "serve": lambda sub: _add_servers(sub, ("serve",)),
    "mcp": lambda sub: _add_servers(sub, ("mcp",)),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with ``only`` the top level and that one command.

    Why ``only``: ``main`` knows the command from argv before parsing, and the
    others' 30-odd subparsers cost about 25 ms to build, on every ``glassroom
    run``.  A command's own usage, help and errors are the same either way; the
    top level's (``glassroom --help``, an unknown command) get the whole parser.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--audit-log", default=argparse.SUPPRESS,
        help="audit log file (default: $GLASSROOM_AUDIT_LOG or the system one)",
    )  # fmt: skip
    p = argparse.ArgumentParser(
        prog=PROG, parents=[common], description="Run agent code in a disposable, audited sandbox."
    )
    # With ``only``, the metavar still names every command, so that the top level's
    # usage (printed with an error such as an unknown option) is the same.
    every = "{" + ",".join(_COMMANDS) + "}" if only else None
    sub = p.add_subparsers(dest="command", required=True, metavar=every)
    _add = sub.add_parser

    def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        return _add(name, parents=[common], **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    for name, add in _COMMANDS.items():
        if only is None or name == only:
            add(sub)
    return p


def _command_named(args: Sequence[str]) -> str | None:
    """The command ``args`` name, if argparse would reach it: the first word
    after the top level's own options (``--audit-log X``); None for ``-h``,
    an unknown word or none."""
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--audit-log":
            i += 2
            continue
        if a.startswith("--audit-log="):
            i += 1
            continue
        return a if a in _COMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    code = _main(argv)
    if argv is None and _command_named(sys.argv[1:]) == "run":
        _end_now(code)
    return code


def _end_now(code: int) -> NoReturn:
    """The end of a ``glassroom run`` process, without the interpreter's teardown.

    Why: freeing every module and object (pydantic's schemas, the policy
    models) at exit is about 90 ms of a ~0.5 s ``run`` on the project's
    machine, and nothing needs it: the sandbox is destroyed, and the audit
    log is written with ``os.write`` and ``fsync`` before ``destroy``
    returns.  What an exit must still do is done: the atexit handlers run
    and stdio is flushed.  Only when nothing else runs (no thread left), and
    only as the console script (``main()`` called with argv, as the tests do,
    returns normally)."""
    if threading.active_count() > 1:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing to save
            stream.flush()
    os._exit(code)


def _main(argv: Sequence[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = _command_named(args)
    if command not in _SERVER_NAMES:
        # pydantic looks for plugins when it first builds a model: it reads the
        # entry points of every installed distribution, about 30 ms of each
        # ``glassroom run`` in a venv of 150 packages.  glassroom's own models have
        # no use for them; a long-lived server keeps them, and a caller's setting wins.
        os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    parser = build_parser(command)
    try:
        ns = parser.parse_args(args)
    except SystemExit as exc:  # argparse misuse: a clear message was printed
        return REFUSED_EXIT if exc.code else 0
    if not hasattr(ns, "audit_log"):
        ns.audit_log = None
    if ns.audit_log:
        os.environ["GLASSROOM_AUDIT_LOG"] = ns.audit_log
    try:
        return int(ns.func(ns))
    except GlassroomError as exc:
        return _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as exc:  # an optional extra that is not installed
        from .._extras import missing_extra

        err = missing_extra(exc, f"{PROG} {ns.func.__name__.removeprefix('cmd_')}")
        return _fail(err.message if err else f"internal error: ModuleNotFoundError: {exc}")
    except Exception as exc:  # a bug: still one line and 125, never a bare traceback
        return _fail(f"internal error: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
