"""One sandbox's egress: its dir, its CA, its proxy; made at create, gone at destroy.

The per-sandbox dir (``<state dir>/egress/<sandbox id>``) holds:

* ``proxy.sock``: the proxy's Unix socket; bind-mounted read-only into the
  sandbox at ``/.glassroom-net``, where the init's forwarder reaches it;
* ``ca.pem`` / ``ca-bundle.pem``: only when a rule inspects TLS.

The dir is owned by the sandbox's host uid, mode 0700, so no other
unprivileged user (and no other sandbox, which sees only its own bind) can
reach this sandbox's proxy.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import _config
from ..plan import NetworkPlan

if TYPE_CHECKING:  # the proxy (asyncio, h11, cryptography) loads when one starts
    from ._decide import Decider
    from ._proxy import ApprovalCallback, Emit, FilterFactory, HeaderHook
    from ._resolve import Resolver
    from ._tls import SandboxCA


@dataclass(frozen=True)
class NetworkOptions:
    """Host-side knobs that are not policy: how names resolve, whom to ask.

    ``resolver``: e.g. ``HostsResolver({"api.test": "127.0.0.1"})`` (tests,
    pinned names); default: the host's resolver.  ``upstream_ca``: a CA file
    the proxy trusts for upstream TLS besides the host's roots (tests).
    ``on_approval``: called (in a worker thread) for each ``ask`` request;
    return True/False to decide, None to leave it to ``glassroom approvals``.
    """

    resolver: Resolver | None = None
    upstream_ca: str | None = None
    on_approval: ApprovalCallback | None = None
    decider: Decider | None = None  # replaces the plan's decisions (tests; E2B overlays)
    rewrite_headers: HeaderHook | None = None  # e.g. credential placeholders
    exchange_filter: FilterFactory | None = None  # credential placeholders and redaction


class Egress:
    def __init__(self, plan: NetworkPlan, sandbox_id: str, emit: Emit,
                 options: NetworkOptions | None = None) -> None:  # fmt: skip
        from ._decide import PlanDecider
        from ._proxy import EgressProxy, ProxyConfig
        from ._tls import SandboxCA

        opts = options or NetworkOptions()
        self.dir = _config.state_dir() / "egress" / sandbox_id
        self.dir.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        self.dir.mkdir(mode=0o700)
        self.ca: SandboxCA | None = None
        try:
            if plan.inspect_tls:
                self.ca = SandboxCA(sandbox_id)
                self.ca.write(str(self.dir))
            self.proxy = EgressProxy(ProxyConfig(
                sandbox_id=sandbox_id, decider=opts.decider or PlanDecider(plan), emit=emit,
                resolver=opts.resolver, ca=self.ca, upstream_ca=opts.upstream_ca,
                ask_timeout_s=plan.ask_timeout_s, on_approval=opts.on_approval,
                rewrite_headers=opts.rewrite_headers,
                exchange_filter=opts.exchange_filter,
            ))  # fmt: skip
            sock = self.dir / "proxy.sock"
            self.proxy.start(unix_path=str(sock))
            uid, gid = _config.sandbox_ids()
            for path in (self.dir, sock, *self.dir.glob("*.pem")):
                if _config.is_root():
                    os.chown(path, uid, gid)
            os.chmod(sock, 0o600)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def stop(self) -> dict[str, Any]:
        """Cut open requests (each still logged), drop the CA key, remove the dir."""
        self.proxy.stop()
        had_ca = self.ca is not None
        self.ca = None
        shutil.rmtree(self.dir, ignore_errors=True)
        return {"egress_dir": str(self.dir), "ca": "destroyed" if had_ca else "none",
                "left": Path(self.dir).exists()}  # fmt: skip
