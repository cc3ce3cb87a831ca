"""A Debian base tree for ``FROM debian:SUITE`` recipes, with their apt packages.

Why mmdebstrap (Debian's own bootstrapper) and not ``debootstrap``: its
``unshare`` mode runs apt and dpkg as root of a *user namespace* mapped onto
unprivileged subordinate ids, so the packages' maintainer scripts never run
with a capability over the host, even when glassroom runs as root; and it
writes a tarball, which the same careful applier as an OCI layer unpacks
(setuid bits dropped, devices left out, no entry outside the root).  It is
also about twice as fast (one apt solve instead of debootstrap's shell loop).

Apt packages are part of the base: a recipe's ``apt`` steps (or a
Dockerfile's ``RUN apt-get install ...``) are installed here, in the same
solve.  A RUN step cannot run apt (it runs as an unprivileged uid with no
mapping for dpkg's owners), so there is no later apt step to fall back to.

**Network.** apt fetches only through a glassroom egress proxy on loopback
whose allow list is the mirror hosts (and nothing else), and every fetch is a
``network.request`` record in the audit log, like a task's.  The packages
are checked by apt against Debian's archive keyring.

**Mirror.** Read from the host's own apt sources (deb822 ``.sources`` files
or ``sources.list``), so glassroom names no host of its own;
``$GLASSROOM_DEBIAN_MIRROR`` overrides it.  The suite's ``-updates`` and
``-security`` entries are used when the host lists them for that suite.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .. import _config
from .._errors import TemplateError
from ._store import TemplateMeta

SUITE = re.compile(r"^[a-z][a-z0-9-]{1,31}$")
#: Debian policy's package name, with an optional ``=version`` (and arch qualifier).
PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?(=[A-Za-z0-9.+~:-]+)?$")
#: Base environment of a Debian tree (what Debian's own images set).
DEBIAN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
#: Left out of the tree by dpkg: documentation and man pages (licences kept).
_DPKG_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/info/*",
)
BOOTSTRAP_TIMEOUT_S = 1800
SOURCES = (Path("/etc/apt/sources.list.d"), Path("/etc/apt/sources.list"))


def _err(msg: str) -> TemplateError:
    return TemplateError(msg, rule="template.debian")


@dataclass(frozen=True)
class Source:
    uri: str
    suite: str
    components: tuple[str, ...]

    def line(self) -> str:
        return f"deb {self.uri} {self.suite} {' '.join(self.components)}"


def _host_sources(paths: tuple[Path, ...] = SOURCES) -> list[Source]:
    """The host's ``deb`` entries, from deb822 files and one-line lists."""
    out: list[Source] = []
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(x for x in p.iterdir() if x.suffix in (".sources", ".list"))
        elif p.is_file():
            files.append(p)
    for f in files:
        try:
            text = f.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    k, _, v = line.partition(":")
                    fields[k.strip().lower()] = v.strip()
                if "deb" not in fields.get("types", "").split():
                    continue
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                comps = tuple(fields.get("components", "main").split())
                for uri in fields.get("uris", "").split():
                    for suite in fields.get("suites", "").split():
                        out.append(Source(uri.rstrip("/"), suite, comps))
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    out.append(
                        Source(words[1].rstrip("/"), words[2], tuple(words[3:]) or ("main",))
                    )
    return [s for s in out if urlsplit(s.uri).scheme in ("http", "https")]


def sources_for(suite: str, host: list[Source] | None = None) -> list[Source]:
    """The apt sources a ``suite`` bootstrap uses (see the module's docstring)."""
    override = os.environ.get("GLASSROOM_DEBIAN_MIRROR")
    if override:
        # One http(s) URL: it becomes one line of apt's sources, so a space, a
        # newline or a "[...]" would add options (trusted=yes) or whole entries.
        try:
            u = urlsplit(override)
            hostname = u.hostname
        except ValueError:
            hostname = None
        if (hostname is None or u.scheme not in ("http", "https") or re.search(r"\s", override)
                or re.search(r"[\[\]]", u.path + u.query + u.fragment)
                or "@" in u.netloc):  # fmt: skip
            raise _err(f"GLASSROOM_DEBIAN_MIRROR {override[:80]!r}: an http:// or https:// "
                       "URL (no spaces or options)")  # fmt: skip
        return [Source(override.rstrip("/"), suite, ("main",))]
    entries = _host_sources() if host is None else host
    family = {suite, f"{suite}-updates", f"{suite}-security"}
    mine = [s for s in entries if s.suite in family]
    if not any(s.suite == suite for s in mine):
        # The host runs another suite: its main archive (the one that is not
        # the security archive) serves every suite.
        main = [s for s in entries if not s.suite.endswith(("-security", "-updates"))]
        if not main:
            raise _err(
                f"debian:{suite}: no Debian mirror in the host's apt sources "
                f"({', '.join(map(str, SOURCES))}); set GLASSROOM_DEBIAN_MIRROR"
            )
        mine = [Source(main[0].uri, suite, ("main",))]
    return mine


def check(suite: str | None, packages: list[str], where: str) -> None:
    if suite is not None and not SUITE.match(suite):
        raise TemplateError(
            f"{where}: {suite!r} is not a Debian suite name", rule="template.recipe"
        )
    for p in packages:
        if not PACKAGE.match(p):
            raise TemplateError(
                f"{where}: {p!r} is not a Debian package name", rule="template.recipe"
            )


def _proxy(hosts: list[tuple[str, int]], build_id: str, audit_log: Path | None) -> Any:
    """A loopback egress proxy that lets apt reach the mirrors and nothing else."""
    from ..audit import AuditLog
    from ..egress._decide import PlanDecider
    from ..egress._proxy import EgressProxy, ProxyConfig
    from ..policy import validate_policy
    from ..policy._network import network_plan

    allow = {f"{h}:{p}" for h, p in hosts}
    # The mirrors are the host's own apt sources, which the host itself trusts
    # (often a cache on a private network): their addresses are allowed by
    # address too, which is how the proxy lets a name resolve to an internal
    # address (egress/_decide.py).  Nothing else is reachable.
    for h, p in hosts:
        try:
            infos = socket.getaddrinfo(h, p, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise _err(f"cannot resolve the Debian mirror {h}: {exc}") from None
        for info in infos:
            ip = str(info[4][0])
            allow.add(f"[{ip}]:{p}" if ":" in ip else f"{ip}:{p}")
    policy = validate_policy({"network": {"allow": sorted(allow)}})
    plan = network_plan(policy)  # the network part alone: no sandbox is planned
    log = AuditLog(audit_log or _config.audit_log_path())

    def emit(details: dict[str, Any], decision: str, rule: str | None) -> None:
        log.append(build_id, "network.request", details, decision=decision, rule=rule)

    proxy = EgressProxy(ProxyConfig(sandbox_id=build_id, decider=PlanDecider(plan), emit=emit))
    proxy.start(tcp=("127.0.0.1", 0))
    return proxy


def bootstrap(
    suite: str,
    packages: list[str],
    staged: Path,
    *,
    cache: Path | None = None,
    audit_log: Path | None,
    progress: Callable[[str], None],
) -> TemplateMeta:
    """Fill ``staged`` with Debian ``suite`` plus ``packages``.  ``cache``: a
    dir of downloaded ``.deb`` files, used and refilled (apt checks each
    against the signed index, so a stale or planted file is not installed)."""
    from ._oci import MAX_BYTES, MAX_ENTRIES, _Applier

    exe = shutil.which("mmdebstrap", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if exe is None:
        raise _err(
            f"debian:{suite}: mmdebstrap is not installed (apt-get install mmdebstrap; "
            "scripts/setup.sh installs it)"
        )
    sources = sources_for(suite)
    hosts = []
    for s in sources:
        u = urlsplit(s.uri)
        hosts.append((u.hostname or "", u.port or (443 if u.scheme == "https" else 80)))
    build_id = "tb-" + secrets.token_hex(6)
    from ..audit import AuditLog

    log = AuditLog(audit_log or _config.audit_log_path())
    log.append(
        build_id,
        "template.bootstrap",
        {"suite": suite, "packages": sorted(packages), "sources": [s.line() for s in sources]},
        decision="allow",
    )
    proxy = _proxy(hosts, build_id, audit_log)
    tmp = Path(tempfile.mkdtemp(prefix="glassroom-debian-"))
    try:
        url = "http://{}:{}".format(*proxy.tcp_address)
        out = tmp / "rootfs.tar"
        argv = [
            exe,
            "--mode=unshare",
            "--variant=apt",
            "--format=tar",
            "--quiet",
            f'--aptopt=Acquire::http::Proxy "{url}"',
            f'--aptopt=Acquire::https::Proxy "{url}"',
            '--aptopt=APT::Install-Recommends "false"',
            *(f"--dpkgopt={x}" for x in _DPKG_EXCLUDES),
        ]
        if packages:
            argv.append("--include=" + ",".join(sorted(set(packages))))
        if cache is not None:  # mmdebstrap's documented way to keep downloads
            cache.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(cache, 0o700)
            argv += ["--skip=essential/unlink",
                     '--setup-hook=mkdir -p "$1"/var/cache/apt/archives/',
                     f"--setup-hook=sync-in {cache} /var/cache/apt/archives/",
                     f"--customize-hook=sync-out /var/cache/apt/archives {cache}"]  # fmt: skip
        argv += [suite, str(out), *(s.line() for s in sources)]
        progress(f"debian:{suite}: bootstrapping with {len(packages)} packages")
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": str(tmp)}
        try:
            r = subprocess.run(
                argv,
                env=env,
                capture_output=True,
                text=True,
                timeout=BOOTSTRAP_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise _err(f"debian:{suite}: the bootstrap took over {BOOTSTRAP_TIMEOUT_S} s") from None
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-6:]
            log.append(
                build_id,
                "template.bootstrap_failed",
                {"suite": suite, "exit": r.returncode},
                decision="deny",
                rule="template.debian",
            )
            raise _err(f"debian:{suite}: mmdebstrap exited {r.returncode}: " + " | ".join(tail))
        progress(f"debian:{suite}: unpacking {out.stat().st_size >> 20} MiB")
        applier = _Applier(staged, MAX_BYTES, MAX_ENTRIES)
        try:
            with tarfile.open(out) as tf:
                applier.apply(tf, f"debian:{suite}")
        except (OSError, tarfile.TarError) as exc:
            raise _err(f"debian:{suite}: cannot unpack the bootstrap: {exc}") from None
    finally:
        proxy.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return TemplateMeta(
        digest="",
        env=dict(DEBIAN_ENV),
        workdir="/",
        source={"kind": "debian", "suite": suite, "packages": sorted(set(packages))},
        dropped=applier.dropped,
    )
