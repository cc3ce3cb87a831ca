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
import sys
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
        for i in range(0, len(text), CHUNK):
            frame(self.kind, text=text[i : i + CHUNK])

    def flush(self) -> None:
        if self.buf:
            text, self.buf = self.buf, ""
            self.emit(text)

    def isatty(self) -> bool:
        return False


def run(code: str, ns: dict[str, object]) -> None:
    tree = ast.parse(code, "<cell>", "exec")
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
