"""IPython's shell escapes and magics in E2B's code interpreter (issue 16).

Notebook-trained agents send them (smolagents sends ``!pip install ...``);
without IPython they were a SyntaxError.  The kernel rewrites a cell that does
not parse as Python (see ``_kernel.py``).  Pairs: a shell escape runs under the
sandbox's policy exactly as a command would, so a tool the policy leaves out is
refused and audited.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .serve_helpers import Server

ci_mod = pytest.importorskip("e2b_code_interpreter")


@pytest.fixture
def interp(serve: Server) -> Iterator[Any]:
    sb = ci_mod.Sandbox.create(timeout=120)
    try:
        yield sb
    finally:
        sb.kill()


def test_shell_escape_and_line_magics(interp: Any) -> None:
    ex = interp.run_code("!echo hi; echo oops >&2\nx = 2\nx * 21")
    assert ex.error is None, ex.error
    assert ex.logs.stdout == ["hi\n"]
    assert ex.logs.stderr == ["oops\n"]
    assert ex.text == "42"
    ex = interp.run_code('files = !printf "a\\nb\\n"\nfiles')
    assert ex.text == "['a', 'b']"
    ex = interp.run_code("%cd /tmp\nimport os\nos.getcwd()")
    assert ex.text == "'/tmp'"
    ex = interp.run_code("%env GR_MAGIC=yes\nimport os\nos.environ['GR_MAGIC']")
    assert ex.text == "'yes'"
    ex = interp.run_code("%pip --version")
    assert ex.error is None
    assert "pip " in "".join(ex.logs.stdout)
    ex = interp.run_code("for i in range(2):\n    !echo loop\n%matplotlib inline")
    assert ex.logs.stdout == ["loop\n", "loop\n"]
    # Python that merely looks like a magic is left alone
    assert interp.run_code("a = 7 % 4\na").text == "3"


def test_cell_magics(interp: Any) -> None:
    ex = interp.run_code("%%bash\necho from $0\nexit 0")
    assert ex.logs.stdout == ["from /bin/bash\n"]
    ex = interp.run_code("%%writefile /home/user/m.txt\nhello\n")
    assert ex.logs.stdout == ["Writing /home/user/m.txt\n"]
    assert interp.files.read("/home/user/m.txt") == "hello\n"
    ex = interp.run_code("%%capture\nprint('hidden')\ny = 5")
    assert ex.logs.stdout == []
    assert interp.run_code("y").text == "5"


def test_unknown_magic_is_an_error_not_a_crash(interp: Any) -> None:
    ex = interp.run_code("%nosuchmagic 1")
    assert ex.error is not None and ex.error.name == "NameError"
    assert ex.error.value == "UsageError: Line magic function `%nosuchmagic` not found."
    ex = interp.run_code("%%nosuchcell\nbody")
    assert ex.error is not None
    assert ex.error.value == "UsageError: Cell magic `%%nosuchcell` not found."
    assert interp.run_code("1 + 1").text == "2"  # the context is still usable


def test_shell_escape_runs_under_the_policy(interp: Any) -> None:
    """Harmless: an allowed tool runs.  Malicious: a tool the template leaves
    out (``perl``), and a write outside the writable dirs, are refused exactly
    as they are for a command (EACCES at exec from Landlock, EROFS from the read-only root)."""
    assert interp.run_code("!ls /home/user >/dev/null && echo ok").logs.stdout == ["ok\n"]
    ex = interp.run_code("!perl -e 'print 1'")
    assert ex.logs.stdout == []
    assert ex.logs.stderr == ["/bin/sh: 1: perl: Permission denied\n"]
    ex = interp.run_code("!touch /etc/evil-magic; echo rc=$?")
    assert ex.logs.stdout == ["rc=1\n"]
    assert ex.logs.stderr == ["touch: cannot touch '/etc/evil-magic': Read-only file system\n"]
    assert interp.run_code("import os; os.path.exists('/etc/evil-magic')").text == "False"
