"""The code interpreter's kernel: runs INSIDE the sandbox, one per context.

Standard library only.  It reads one JSON request per line on stdin
(``{"code": ..., "env": {...}}``) and runs it in one persistent namespace, so
state is kept across calls.  Everything it reports is a frame on stdout: a
line starting with ``\\x1e`` + the nonce given in ``argv[1]``, then JSON
(``stdout``/``stderr`` text, ``result`` for the value of a final
expression, ``error``, ``end``).  Output a subprocess writes straight to
fd 1 has no frame prefix, and the server reports it as stdout.

Frames are kept small (stream text in pieces of CHUNK characters, a result
or error cut at FIELD_MAX characters) because the server treats any line
longer than a few MiB as plain output: the code in here can forge frames, so
the server bounds and checks everything it reads from this process.
"""

import ast
import json
import os
import re
import selectors
import shlex
import subprocess
import sys
import time
import traceback

NONCE = sys.argv[1] if len(sys.argv) > 1 else ""
CHUNK = 16 * 1024
FIELD_MAX = 128 * 1024
REAL_OUT = sys.stdout
REAL_ERR = sys.stderr


def cut(text: str) -> str:
    if len(text) <= FIELD_MAX:
        return text
    return text[:FIELD_MAX] + f"... [{len(text) - FIELD_MAX} characters cut]"


def frame(kind: str, **kw: object) -> None:
    kw["type"] = kind
    REAL_OUT.write("\x1e" + NONCE + json.dumps(kw) + "\n")
    REAL_OUT.flush()


class Writer:
    """Line-buffered, like a notebook's stream: ``print('hi')`` is one "hi\\n" event."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.buf = ""

    def write(self, text: str) -> int:
        text = str(text)
        self.buf += text
        if "\n" in self.buf:
            head, _, self.buf = self.buf.rpartition("\n")
            self.emit(head + "\n")
        if len(self.buf) >= CHUNK:  # a long line without a newline goes out in pieces
            self.emit(self.buf)
            self.buf = ""
        return len(text)

    def emit(self, text: str) -> None:
        if self.kind == "discard":  # %%capture
            return
        for i in range(0, len(text), CHUNK):
            frame(self.kind, text=text[i : i + CHUNK])

    def flush(self) -> None:
        if self.buf:
            text, self.buf = self.buf, ""
            self.emit(text)

    def isatty(self) -> bool:
        return False


# IPython's shell escapes and magics, which notebook-trained agents send
# (smolagents sends ``!pip install ...``).  IPython itself is not in a sandbox
# image, and importing it would cost each context its start-up, so the few
# that agents use are rewritten here: a cell that parses as Python is never
# touched; otherwise each line that starts with ``!`` or ``%`` becomes a call
# of ``_glassroom_magic`` (``x = !cmd`` gives the output's lines, as IPython's
# does).  Commands run inside the sandbox under its policy like any other.
MAGIC_LINE = re.compile(r"^(\s*)(?:([A-Za-z_][A-Za-z0-9_]*)\s*=\s*)?(!!?|%)(.*)$")
CELL_MAGICS = ("bash", "sh", "writefile", "capture", "time")


def shell(cmd: str, capture: bool = False) -> object:
    """Run ``cmd`` with sh, its output streamed to the cell's stdout/stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    proc = subprocess.Popen(
        ["/bin/sh", "-c", cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    got: list[bytes] = []
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None and proc.stderr is not None
    sel.register(proc.stdout, selectors.EVENT_READ, sys.stdout)
    sel.register(proc.stderr, selectors.EVENT_READ, sys.stderr)
    while sel.get_map():
        for key, _ in sel.select():
            data = os.read(key.fd, 65536)
            if not data:
                sel.unregister(key.fileobj)
                continue
            if capture and key.data is sys.stdout:
                got.append(data)
            else:
                key.data.write(data.decode(errors="replace"))
    proc.wait()  # like IPython: a failed command is its output, not an error
    if capture:
        return b"".join(got).decode(errors="replace").splitlines()
    return None


def line_magic(name: str, arg: str, ns: dict[str, object]) -> object:
    if name == "pip":
        return shell(shlex.join([sys.executable, "-m", "pip", *shlex.split(arg)]))
    if name == "cd":
        os.chdir(os.path.expanduser(arg.strip() or "~"))
        print(os.getcwd())
        return None
    if name == "pwd":
        return os.getcwd()
    if name == "env":
        if "=" in arg:
            key, _, value = arg.partition("=")
            os.environ[key.strip()] = value.strip()
            return None
        return os.environ.get(arg.strip()) if arg.strip() else dict(os.environ)
    if name == "matplotlib":
        return None  # inline output needs no set-up here: a figure is saved by the code
    if name == "time":
        t0 = time.perf_counter()
        value = eval(compile(arg, "<magic>", "eval"), ns)
        print(f"Wall time: {(time.perf_counter() - t0) * 1000:.2f} ms")
        return value
    raise NameError(f"UsageError: Line magic function `%{name}` not found.")


def cell_magic(name: str, arg: str, body: str, ns: dict[str, object]) -> None:
    if name in ("bash", "sh"):
        shell(shlex.join([f"/bin/{name}", "-c", body]))
    elif name == "writefile":
        path = os.path.expanduser(arg.strip())
        with open(path, "w") as f:
            f.write(body)
        print(f"Writing {path}")
    elif name == "capture":
        out, err = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = Writer("discard")
        try:
            run(body, ns)
        finally:
            sys.stdout, sys.stderr = out, err
    elif name == "time":
        t0 = time.perf_counter()
        run(body, ns)
        print(f"Wall time: {(time.perf_counter() - t0) * 1000:.2f} ms")
    else:
        raise NameError(f"UsageError: Cell magic `%%{name}` not found.")


def magic(kind: str, text: str, ns: dict[str, object], capture: bool = False) -> object:
    if kind.startswith("!"):
        return shell(text, capture)
    name, _, arg = text.strip().partition(" ")
    if name.startswith("!"):  # `%!cmd`? not IPython: refuse plainly
        raise NameError(f"UsageError: Line magic function `%{name}` not found.")
    return line_magic(name, arg, ns)


def rewrite(code: str) -> str:
    """The cell with its magic lines made into calls; the cell itself if it is Python."""
    try:
        ast.parse(code, "<cell>", "exec")
        return code
    except SyntaxError:
        pass
    lines = code.split("\n")
    out = []
    for ln in lines:
        m = MAGIC_LINE.match(ln)
        if m is None:
            out.append(ln)
            continue
        indent, var, kind, text = m.groups()
        call = f"_glassroom_magic({kind!r}, {text!r}, globals(), {var is not None})"
        out.append(f"{indent}{var} = {call}" if var else f"{indent}{call}")
    return "\n".join(out)


def run(code: str, ns: dict[str, object]) -> None:
    ns.setdefault("_glassroom_magic", magic)
    first, _, rest = code.lstrip("\n").partition("\n")
    if first.startswith("%%"):
        name, _, arg = first[2:].strip().partition(" ")
        cell_magic(name, arg, rest, ns)
        return
    tree = ast.parse(rewrite(code), "<cell>", "exec")
    last = None
    tail = tree.body[-1] if tree.body else None
    if isinstance(tail, ast.Expr):
        tree.body.pop()
        last = ast.Expression(tail.value)
    exec(compile(tree, "<cell>", "exec"), ns)
    if last is not None:
        value = eval(compile(last, "<cell>", "eval"), ns)
        if value is not None:
            frame("result", text=cut(repr(value)), is_main_result=True)


def main() -> None:
    ns: dict[str, object] = {"__name__": "__main__"}
    count = 0
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        try:
            req = json.loads(line)
        except ValueError:
            continue
        if not isinstance(req, dict):
            continue
        env = req.get("env")
        env = env if isinstance(env, dict) else {}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update({str(k): str(v) for k, v in env.items()})
        out, err = Writer("stdout"), Writer("stderr")
        sys.stdout, sys.stderr = out, err
        try:
            run(str(req.get("code", "")), ns)
        except BaseException as exc:
            out.flush()
            err.flush()
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            frame("error", name=type(exc).__name__, value=cut(str(exc)), traceback=cut(tb))
        finally:
            out.flush()
            err.flush()
            sys.stdout, sys.stderr = REAL_OUT, REAL_ERR
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        count += 1
        frame("end", execution_count=count)


if __name__ == "__main__":
    main()
