"""The compiled init checks the host's ``config`` exactly as the Python inits do,
and a request too large for the control channel is a clear error on both.

The config is the supervisor's (trusted), so a malformed one is a glassroom
bug: what matters is that both inits fail closed the same way, so that the
host sees the same thing whichever init ran.  What the Python inits do
(``sandbox_init.py`` / ``init_stream.py``, CPython 3.11):

* a refused limit (``setrlimit`` raises OSError or ValueError: EPERM, EINVAL,
  an invalid resource such as ``RLIM_INFINITY``) is a ``fatal`` reply, wall
  ``rlimits``, error ``"NAME: <what CPython says>"``, exit 125;
* anything else (a missing ``rlimits``, ``read``, ... key; ``rlimits`` not a
  dict; a value that is no int or beyond 64 bits; a name ``resource`` lacks, or
  one that is no int there; a path list that is no iterable or holds a non-path)
  raises past those handlers: no reply, exit status 1, and the traceback's last
  line on stderr, which the namespaces host shows ("namespaces: bwrap failed:
  KeyError: 'rlimits'");
* a negative limit is cast as CPython casts it: -1 is RLIM_INFINITY (refused
  where the hard limit is lower), -2 is 2**64-2;
* a str of paths is iterated: each character is a path (``"/"`` works);
  a dict's keys are paths; a bytes path works.

Known residue (marshal.c, not changed here): the C init's marshal reader takes
no floats (the whole message is "malformed": a ``fatal`` ``init``, exit 125,
where Python raises a TypeError) and cannot tell a tuple from a list.

The inits are driven directly (no bwrap, no runsc): the namespaces init on a
SOCK_SEQPACKET socketpair, the stream init on pipes as pid 1 of a new pid
namespace (it runs only as pid 1).
"""

from __future__ import annotations

import marshal
import os
import select
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

import glassroom._sys as sysdir
from glassroom import Sandbox, WallError
from glassroom._config import state_dir
from glassroom._sys import agent_build
from glassroom.backends import _channel, namespaces
from glassroom.backends._channel import MAX_REQUEST, Channel, RequestTooLarge

SYS = os.path.dirname(os.path.abspath(sysdir.__file__))
PYTHON = "/usr/bin/python3"
Outcome = tuple[str, int, str]  # (reply, exit status, last line on stderr)


@pytest.fixture(autouse=True)
def _built() -> None:
    if agent_build.find(state_dir()) is None:
        pytest.skip("the compiled init is not built (no C compiler); CI builds it")
    if not os.path.exists(PYTHON):
        pytest.skip("no /usr/bin/python3 for the Python init")


def _compiled() -> str:
    path = agent_build.find(state_dir())
    assert path is not None
    return str(path)


def _ns_cmd(which: str) -> list[str]:
    if which == "compiled":
        return [_compiled()]
    launch = f"import sys;sys.path.insert(0,{SYS!r});import sandbox_init as m;m.main()"
    return [PYTHON, "-I", "-S", "-c", launch]


def _stream_cmd(which: str) -> list[str]:
    if which == "compiled":
        inner = [_compiled(), "--stream"]
    else:
        launch = f"import sys;sys.path.insert(0,{SYS!r});import init_stream as m;m.main()"
        inner = [PYTHON, "-I", "-S", "-c", launch]
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *user, "--pid", "--fork", "--kill-child", *inner]


def _last_line(raw: bytes) -> str:
    lines = raw.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


def _start_ns(
    which: str, tmp: Path, sndbuf: int = 0
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    host, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if sndbuf:
        try:
            host.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            if host.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < sndbuf:
                host.setsockopt(socket.SOL_SOCKET, 32, sndbuf)  # SO_SNDBUFFORCE (root)
        except OSError:
            pass
        if host.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < sndbuf:
            host.close()
            child.close()
            pytest.skip("this host caps SO_SNDBUF below a 1 MiB datagram")
    p = subprocess.Popen([*_ns_cmd(which), str(child.fileno())], pass_fds=(child.fileno(),),
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, cwd=tmp)  # fmt: skip
    child.close()
    host.settimeout(10)
    return p, host


def _finish(p: subprocess.Popen[bytes], host: socket.socket) -> tuple[int, str]:
    host.close()
    try:
        rc = p.wait(10)
    finally:
        p.kill()
    assert p.stderr is not None
    return rc, _last_line(p.stderr.read())


def ns_outcome(which: str, cfg: dict[str, Any], tmp: Path) -> Outcome:
    p, host = _start_ns(which, tmp)
    host.send(marshal.dumps(cfg))
    try:
        reply = host.recv(1 << 16).decode()
    except ConnectionResetError:  # it exited without a word
        reply = ""
    rc, err = _finish(p, host)
    return reply.replace(f'"pid":{p.pid}', '"pid":P'), rc, err


def stream_outcome(which: str, cfg: dict[str, Any], tmp: Path) -> Outcome:
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to make a pid namespace")
    p = subprocess.Popen(_stream_cmd(which), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=tmp)  # fmt: skip
    assert p.stdin is not None and p.stdout is not None and p.stderr is not None
    data = marshal.dumps(cfg)
    try:
        p.stdin.write(b"M" + bytes(4) + len(data).to_bytes(4, "big") + data)
        p.stdin.flush()
    except BrokenPipeError:
        pass
    out = b""
    fd = p.stdout.fileno()
    while len(out) < 9 or len(out) < 9 + int.from_bytes(out[5:9], "big"):
        if not select.select([fd], [], [], 10)[0]:
            break
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        out += chunk
    try:
        p.stdin.close()
    except BrokenPipeError:
        pass
    try:
        rc = p.wait(10)
    finally:
        p.kill()
    return out[9:].decode(), rc, _last_line(p.stderr.read())


BASE: dict[str, Any] = {
    "op": "config", "read": ["/usr"], "write": [], "execute": [], "devices": ["/dev"],
    "listable": ["/"], "rlimits": {"RLIMIT_CORE": 0},
}  # fmt: skip
DROP = object()


def cfg(**changes: Any) -> dict[str, Any]:
    out = dict(BASE)
    for key, value in changes.items():
        if value is DROP:
            out.pop(key)
        else:
            out[key] = value
    return out


#: rlimits cases: the same on the namespaces and the stream init.
RLIMITS: dict[str, dict[str, Any]] = {
    "harmless": cfg(),
    "missing": cfg(rlimits=DROP),
    "a list": cfg(rlimits=[]),
    "None": cfg(rlimits=None),
    "a str": cfg(rlimits="RLIMIT_CORE"),
    "an int": cfg(rlimits=0),
    "a set": cfg(rlimits={"RLIMIT_CORE"}),
    "-1 (RLIM_INFINITY), hard limit infinite": cfg(rlimits={"RLIMIT_CORE": -1}),
    "-2 (2**64-2)": cfg(rlimits={"RLIMIT_CORE": -2}),
    "-1 past the hard limit": cfg(rlimits={"RLIMIT_CORE": 0, "RLIMIT_NOFILE": -1}),
    "-2 past the hard limit": cfg(rlimits={"RLIMIT_NOFILE": -2}),
    "True (1)": cfg(rlimits={"RLIMIT_CORE": True}),
    "a str value": cfg(rlimits={"RLIMIT_CORE": "0"}),
    "a None value": cfg(rlimits={"RLIMIT_CORE": None}),
    "a list value": cfg(rlimits={"RLIMIT_CORE": [0]}),
    "2**63": cfg(rlimits={"RLIMIT_CORE": 1 << 63}),
    "-2**70": cfg(rlimits={"RLIMIT_CORE": -(1 << 70)}),
    "unknown name": cfg(rlimits={"RLIMIT_FOO": 1}),
    "not in Python's resource (Linux has it)": cfg(rlimits={"RLIMIT_LOCKS": 1}),
    "an alias": cfg(rlimits={"RLIMIT_OFILE": 64}),
    "far from any name": cfg(rlimits={"NOFILE": 1}),
    "lower case": cfg(rlimits={"rlimit_core": 0}),
    "case flips": cfg(rlimits={"Rlimit_Core": 0}),
    "a NUL in the name": cfg(rlimits={"RLIMIT_AS\0": 1}),
    "an int name": cfg(rlimits={4: 0}),
    "a None name": cfg(rlimits={None: 0}),
    "an int attribute, invalid resource": cfg(rlimits={"RLIM_INFINITY": 0}),
    "an int attribute, a valid one": cfg(rlimits={"RUSAGE_SELF": 100}),
    "a function": cfg(rlimits={"getrlimit": 0}),
    "a class": cfg(rlimits={"error": 0}),
    "None there": cfg(rlimits={"__doc__": 0}),
    "in order: a refusal first": cfg(rlimits={"RLIMIT_NOFILE": 1 << 40, "RLIMIT_FOO": 0}),
    "in order: a crash first": cfg(rlimits={"RLIMIT_FOO": 0, "RLIMIT_NOFILE": 1 << 40}),
}

#: Landlock path lists: the namespaces init only (gVisor has no Landlock).
PATHS: dict[str, dict[str, Any]] = {
    **{f"no {k}": cfg(**{k: DROP}) for k in ("read", "write", "execute", "devices", "listable")},
    "no read and no rlimits": cfg(read=DROP, rlimits=DROP),
    "read: an int": cfg(read=5),
    "read: None": cfg(read=None),
    "read: True": cfg(read=True),
    "write: an int": cfg(write=1),
    "read: a str of one path": cfg(read="/"),
    "read: a str (each character is a path)": cfg(read="/usr"),
    "read: a str with a NUL": cfg(read="/\0"),
    "read: bytes": cfg(read=b"/usr"),
    "read: empty bytes": cfg(read=b""),
    "read: a dict (its keys)": cfg(read={"/usr": 0}),
    "read: a dict with an int key": cfg(read={5: "/usr"}),
    "read: a set": cfg(read={"/usr"}),
    "read: [an int]": cfg(read=[5]),
    "read: [None]": cfg(read=[None]),
    "read: [a list]": cfg(read=[["/usr"]]),
    "read: [bytes]": cfg(read=[b"/usr"]),
    "read: [bytes with a NUL]": cfg(read=[b"/u\0"]),
    "read: [a str with a NUL]": cfg(read=["/u\0"]),
    "read: ['']": cfg(read=[""]),
    "read: [missing]": cfg(read=["/nonexistent 'x'"]),
    "read: [missing bytes]": cfg(read=[b"/nonexistent"]),
    "execute: [a str], devices: an int": cfg(execute=["/usr/bin/true"], devices=3),
}

#: What the Python init does, pinned: the fail-closed cases must not pass.
PINNED: dict[str, Outcome] = {
    "missing": ("", 1, "KeyError: 'rlimits'"),
    "a list": ("", 1, "AttributeError: 'list' object has no attribute 'items'"),
    "-2 past the hard limit": (
        '{"op":"fatal","wall":"rlimits","error":"RLIMIT_NOFILE: not allowed to raise '
        'maximum limit"}', 125, ""),
    "a str value": ("", 1, "TypeError: 'str' object cannot be interpreted as an integer"),
    "2**63": ("", 1, "OverflowError: Python int too large to convert to C long"),
    "unknown name": ("", 1, "AttributeError: module 'resource' has no attribute 'RLIMIT_FOO'. "
                            "Did you mean: 'RLIMIT_AS'?"),
    "an int attribute, invalid resource": (
        '{"op":"fatal","wall":"rlimits","error":"RLIM_INFINITY: invalid resource specified"}',
        125, ""),
    "no read": ("", 1, "KeyError: 'read'"),
    "read: [an int]": (
        "", 1, "TypeError: open: path should be string, bytes or os.PathLike, not int"),
    "read: a str (each character is a path)": (
        '{"op":"fatal","wall":"landlock","error":"[Errno 2] landlock: read path \'u\': '
        'No such file or directory"}', 125, ""),
}  # fmt: skip


def _ready(o: Outcome) -> bool:
    return o[0].startswith('{"op":"ready"') and o[1] == 0


#: The harmless twins: they start.  Whether the ones in DEPENDS start depends on
#: the host's own limits (the same for both inits); every other case must not.
HARMLESS = {
    "harmless",
    "True (1)",
    "an alias",
    "read: a str of one path",
    "read: a dict (its keys)",
    "read: [bytes]",
    "read: a set",
    "read: empty bytes",
}
DEPENDS = {
    "-1 (RLIM_INFINITY), hard limit infinite",
    "-2 (2**64-2)",
    "an int attribute, a valid one",
}


@pytest.mark.parametrize("case", [*RLIMITS, *PATHS])
def test_namespaces_init_checks_the_config_as_the_python_one(case: str, tmp_path: Path) -> None:
    config = {**RLIMITS, **PATHS}[case]
    py = ns_outcome("python", config, tmp_path)
    c = ns_outcome("compiled", config, tmp_path)
    assert c == py
    if case in PINNED:
        assert py == PINNED[case]
    if case in HARMLESS:
        assert _ready(c), c
    elif case not in DEPENDS:
        assert not _ready(c), c


@pytest.mark.parametrize("case", list(RLIMITS))
def test_stream_init_checks_the_config_as_the_python_one(case: str, tmp_path: Path) -> None:
    config = RLIMITS[case]
    py = stream_outcome("python", config, tmp_path)
    c = stream_outcome("compiled", config, tmp_path)
    assert c == py
    if case == "harmless":
        assert _ready(c), c
    if case in ("missing", "a list", "a str value", "2**63", "unknown name"):
        assert c == PINNED[case]


@pytest.mark.parametrize("case", ["a float value", "a float path", "a tuple"])
def test_the_known_residue_still_fails_closed(case: str, tmp_path: Path) -> None:
    """What the C marshal reader cannot tell apart: both inits refuse to start."""
    config = {"a float value": cfg(rlimits={"RLIMIT_CORE": 1.5}),
              "a float path": cfg(read=[1.5]), "a tuple": cfg(rlimits=())}[case]  # fmt: skip
    py = ns_outcome("python", config, tmp_path)
    c = ns_outcome("compiled", config, tmp_path)
    assert not _ready(py) and not _ready(c)
    if case == "a tuple":
        assert py == ("", 1, "AttributeError: 'tuple' object has no attribute 'items'")
        assert c == ("", 1, "AttributeError: 'list' object has no attribute 'items'")
    else:
        assert py[:2] == ("", 1) and py[2].startswith("TypeError: ")
        assert c == ('{"op":"fatal","wall":"init","error":"malformed message"}', 125, "")


def test_the_host_says_the_same_whichever_init_ran(
    init: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through bwrap: a config without ``rlimits`` is the same WallError on both."""
    with Sandbox({}, backend="namespaces") as sb:  # the harmless twin
        assert sb.walls["init"] == init
        assert sb.run(["echo", "ok"]).stdout == "ok\n"
    real = namespaces.init_config

    def without_rlimits(plan: Any) -> dict[str, Any]:
        out = dict(real(plan))
        out.pop("rlimits")
        return out

    monkeypatch.setattr(namespaces, "init_config", without_rlimits)
    with pytest.raises(WallError) as info:
        Sandbox({}, backend="namespaces")
    # the init's last words on stderr are what the host reports (build())
    assert info.value.rule == "namespaces"
    assert str(info.value) == "namespaces: bwrap failed: KeyError: 'rlimits'"


# ---------------------------------------------------------------- item 2: request size


def test_a_huge_argv_is_a_clear_error_and_the_sandbox_runs_on(init: str) -> None:
    with Sandbox({}, backend="namespaces") as sb:
        assert sb.walls["init"] == init
        r = sb.run(["sh", "-c", 'echo "$#"', "sh", *["x"] * 20_000])  # the harmless twin
        assert (r.exit_code, r.stdout) == (0, "20000\n")
        r = sb.run(["sh", "-c", 'echo "$#"', "sh", *["x"] * 100_000])
        assert r.exit_code == 127 and r.stdout == ""
        assert "exec request of" in r.stderr
        assert "-byte limit of one message to the sandbox's init" in r.stderr
        assert "(argv, env and cwd together)" in r.stderr
        # the same in the background
        proc = sb.spawn(["sh", "-c", "true", "sh", *["x"] * 100_000])
        res = proc.wait(10)
        assert res is not None and res.exit_code == 127 and b"-byte limit of one message" in res.stderr
        # nothing was sent: the init and the sandbox run on
        assert sb.run(["echo", "alive"]).stdout == "alive\n"


def test_a_huge_argv_on_gvisor_is_a_clear_error_too(init: str) -> None:
    """The stream inits stop on a message over their 1 MiB bound: the host refuses it."""
    with Sandbox({"risk": "medium"}, backend="gvisor") as sb:
        assert sb.walls["init"] == init
        r = sb.run(["sh", "-c", 'echo "$#"', "sh", *["x"] * 50_000])  # the harmless twin
        assert (r.exit_code, r.stdout) == (0, "50000\n")
        r = sb.run(["sh", "-c", 'echo "$#"', "sh", *["x"] * 250_000])
        assert r.exit_code == 127 and r.stdout == ""
        assert "-byte limit of one message to the sandbox's init" in r.stderr, r
        assert sb.run(["echo", "alive"]).stdout == "alive\n"


def test_the_limit_is_the_socket_s_or_the_init_s() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        ch = Channel(a, lambda _what: None)
        sndbuf = a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert ch.max_request == min(MAX_REQUEST, sndbuf - 32)
        ch.send({"op": "x", "pad": "y" * (ch.max_request - 64)})  # fits
        assert len(b.recv(1 << 21)) <= ch.max_request
        with pytest.raises(RequestTooLarge) as info:
            ch.send({"op": "exec", "argv": ["x"] * ch.max_request})
        assert info.value.limit == ch.max_request and info.value.rule == "init.max_message"
        assert f"exceeds the {ch.max_request}-byte limit" in str(info.value)
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(1)  # nothing was sent
    finally:
        a.close()
        b.close()
    assert _channel.MAX_REQUEST == 1 << 20  # MAX_MSG of sandbox_init.py and agent.h


@pytest.mark.parametrize("which", ["compiled", "python"])
def test_a_request_of_the_init_s_limit_reaches_it_whole(which: str, tmp_path: Path) -> None:
    """With a socket buffer past 1 MiB, MAX_REQUEST is the limit: a request of that
    size is read whole by both inits; one byte more would stop them both, which is
    why the host refuses it before sending."""

    def padded(size: int) -> bytes:
        msg = {"op": "pad", "id": 7, "x": ""}
        fill = size - len(marshal.dumps(msg)) - 3  # 'z'/'a' + length grows the str
        data = marshal.dumps({"op": "pad", "id": 7, "x": "y" * fill})
        while len(data) < size:
            fill += 1
            data = marshal.dumps({"op": "pad", "id": 7, "x": "y" * fill})
        assert len(data) == size
        return data

    p, host = _start_ns(which, tmp_path, sndbuf=4 * MAX_REQUEST)
    try:
        host.send(marshal.dumps(BASE))
        assert host.recv(1 << 16).startswith(b'{"op":"ready"')
        assert Channel(host, lambda _w: None).max_request == MAX_REQUEST
        host.send(padded(MAX_REQUEST))
        assert (
            host.recv(1 << 16) == b'{"op":"error","id":7,"errno":22,"error":"unknown op \'pad\'"}'
        )
        host.send(padded(MAX_REQUEST + 1))  # what the host never sends
        try:
            said = host.recv(1 << 16)
        except ConnectionResetError:
            said = b""
    finally:
        rc, err = _finish(p, host)
    if which == "compiled":
        assert (said, rc) == (b'{"op":"fatal","wall":"init","error":"malformed message"}', 125)
    else:
        assert said == b"" and rc == 1 and err.startswith(("EOFError", "ValueError"))
