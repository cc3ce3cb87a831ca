"""The code interpreter's kernel: runs INSIDE the sandbox, one per context.

Standard library only.  It reads one JSON request per line on stdin
(``{"code": ..., "env": {...}}``) and runs it in one persistent namespace, so
state is kept across calls.  Everything it reports is a frame on stdout: a
line starting with ``\\x1e`` + the nonce given in ``argv[1]``, then JSON
(``stdout``/``stderr`` text, ``result`` for the value of a final
expression, of ``display()`` or of a matplotlib figure, with its display
``formats``, ``error``, ``end``).  Output a subprocess writes straight to
fd 1 has no frame prefix, and the server reports it as stdout.  What the
cell's code imported it uses as it finds it (matplotlib's pyplot, an object's
``_repr_png_``): that comes from the template's python3, never the host's.

Frames are kept small (stream text in pieces of CHUNK characters, a result
or error cut at FIELD_MAX characters) because the server treats any line
longer than a few MiB as plain output: the code in here can forge frames, so
the server bounds and checks everything it reads from this process.
"""

import ast
import base64
import io
import json
import linecache
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
    ns.setdefault("display", display)
    first, _, rest = code.lstrip("\n").partition("\n")
    if first.startswith("%%"):
        name, _, arg = first[2:].strip().partition(" ")
        cell_magic(name, arg, rest, ns)
        return
    # The cell's source, for its tracebacks (a notebook shows the failing line).
    linecache.cache["<cell>"] = (len(code), None, code.splitlines(True), "<cell>")
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
            show(value, main=True)


# What E2B's Result carries besides text, made the way IPython makes them: by
# the value's ``_repr_*_`` methods (a PIL image's PNG, a DataFrame's HTML).
# smolagents hands a PNG/JPEG result to its model as an image.  Each method is
# looked up on the type, so an object whose __getattr__ answers anything is not
# asked for it.  A format that would take the frame past FORMATS_BUDGET bytes
# is left out, never cut (a cut PNG is no PNG): the frame stays far below the
# server's frame bound.
FORMATS = (("html", "_repr_html_"), ("markdown", "_repr_markdown_"), ("svg", "_repr_svg_"),
           ("png", "_repr_png_"), ("jpeg", "_repr_jpeg_"), ("latex", "_repr_latex_"))  # fmt: skip
FORMATS_BUDGET = 3 << 20


def formats(value: object) -> dict[str, str]:
    out: dict[str, str] = {}
    budget = FORMATS_BUDGET
    for key, name in FORMATS:
        method = getattr(type(value), name, None)
        if not callable(method):
            continue
        try:
            data = method(value)
        except Exception:
            continue  # as IPython: a failing formatter is no format
        if isinstance(data, tuple) and data:  # (data, metadata)
            data = data[0]
        if isinstance(data, bytes) and key in ("png", "jpeg"):
            data = base64.b64encode(data).decode("ascii")
        if not isinstance(data, str):
            continue
        size = len(json.dumps(data))
        if size <= budget:
            budget -= size
            out[key] = data
    return out


def show(value: object, main: bool) -> None:
    kw: dict[str, object] = {"text": cut(repr(value)), "is_main_result": main}
    rich = formats(value)
    if rich:
        kw["formats"] = rich
    frame("result", **kw)


def flush_figures() -> None:
    """As IPython's inline backend does after each cell: every matplotlib
    figure the cell left open is shown (a PNG result that is not the cell's
    value) and closed.  ``plt.show()`` does nothing under a non-interactive
    backend (the code-interpreter template sets Agg), so this is what shows a
    plot, as on E2B.  Nothing happens unless the cell's code imported pyplot."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return
    try:
        for num in plt.get_fignums():
            fig = plt.figure(num)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", bbox_inches="tight")
            png = base64.b64encode(buf.getvalue()).decode("ascii")
            rich = {"png": png} if len(png) <= FORMATS_BUDGET else {}
            frame("result", text=cut(repr(fig)), is_main_result=False, formats=rich)
    finally:
        plt.close("all")


def display(*objs: object, **_: object) -> None:
    """IPython's ``display()``: each object a result that is not the cell's value."""
    for obj in objs:
        show(obj, main=False)


def cell_traceback(exc: BaseException) -> str:
    """The traceback as a notebook shows it: from the cell on.  The kernel's own
    frames (it runs as ``python3 -c``, so its file is ``<string>``) are left
    out: an agent reads this (smolagents hands it to its model), and its code's
    frames are what it can act on."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == "<string>":
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


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
            flush_figures()
        except BaseException as exc:
            out.flush()
            err.flush()
            tb = cell_traceback(exc)
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
