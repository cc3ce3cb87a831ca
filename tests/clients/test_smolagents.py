"""smolagents' ``CodeAgent(executor_type="e2b")``, unmodified, against a real
``glassroom serve`` on 127.0.0.1, on every tier.

Its E2B executor makes an ``e2b_code_interpreter`` sandbox of E2B's default
template, ``code-interpreter-v1``, sends its tools' code to the kernel at start
(which imports PIL: the patched ``final_answer``), then runs each code action
as a cell; ``final_answer`` ends a cell with an exception the executor reads.
serve's ``code-interpreter-v1`` is pointed here at the built-in store template
``code-interpreter`` (Debian's python3 with numpy, pandas, matplotlib, Pillow),
so the kernel (interfaces/e2b/_kernel.py) runs on the template's python3 and
numpy and PIL come from the template, never from the host.

The model is scripted (a smolagents ``Model`` that returns fixed code actions):
no request leaves the machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytest.importorskip("smolagents", reason="smolagents (the [test] extra) is not installed")
pytest.importorskip("e2b_code_interpreter", reason="e2b-code-interpreter is not installed")

import PIL.Image
from smolagents import ChatMessage, CodeAgent, Model
from smolagents.memory import ActionStep
from smolagents.models import MessageRole

from glassroom.audit import read_records
from glassroom.interfaces.http._config import builtin_templates
from glassroom.policy import validate_policy
from interfaces.serve_helpers import Server, serving_e2b

from .conftest import RISK, need_store_template

#: The store template (templates/builtin/code-interpreter.toml).
STORE_TEMPLATE = "code-interpreter"
#: How a write into the template's tree fails, per tier: its read-only bind on
#: namespaces and in the microVM's root; gVisor answers EACCES for it.
WRITE_REFUSED = {
    "namespaces": "[Errno 30] Read-only file system",
    "gvisor": "[Errno 13] Permission denied",
    "microvm": "[Errno 30] Read-only file system",
}


class ScriptedModel(Model):
    """A model that answers with the given code actions, in order."""

    def __init__(self, actions: list[str]) -> None:
        super().__init__(model_id="scripted")
        self.actions = list(actions)

    def generate(self, messages: Any, stop_sequences: Any = None, response_format: Any = None,
                 tools_to_call_from: Any = None, **kwargs: Any) -> ChatMessage:  # fmt: skip
        assert self.actions, "the agent asked the model for more steps than scripted"
        code = self.actions.pop(0)
        return ChatMessage(
            role=MessageRole.ASSISTANT, content=f"Thought: run it.\n<code>\n{code}\n</code>"
        )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    need_store_template(STORE_TEMPLATE)
    with serving_e2b(tmp_path_factory.mktemp("serve")) as srv:
        yield srv


@pytest.fixture
def on_tier(served: Server, backend: str) -> Iterator[Server]:
    """serve's ``code-interpreter-v1`` (the template smolagents' executor
    creates) as the built-in one with ``template = "code-interpreter"``, on
    ``backend``'s tier."""
    pol = builtin_templates()["code-interpreter-v1"].model_dump()
    pol["template"] = STORE_TEMPLATE
    pol["risk"] = RISK[backend]
    saved = served.cfg.templates["code-interpreter-v1"]
    served.cfg.templates["code-interpreter-v1"] = validate_policy(pol)
    try:
        yield served
    finally:
        served.cfg.templates["code-interpreter-v1"] = saved


#: The sandbox's lifetime, as a user passes it (smolagents hands these to
#: E2B's ``Sandbox.create``): without it E2B's default of 15 s applies, which
#: a microVM under TCG on a slow machine spends starting the kernel.
EXECUTOR_KWARGS = {"timeout": 600}


def _run(*actions: str) -> tuple[Any, list[ActionStep]]:
    """A CodeAgent run whose code actions are ``actions``, the last of which
    calls final_answer: (the final answer, the run's steps)."""
    agent = CodeAgent(
        tools=[], model=ScriptedModel(list(actions)), executor_type="e2b",
        max_steps=len(actions), executor_kwargs=EXECUTOR_KWARGS,
    )  # fmt: skip
    try:
        answer = agent.run("Do the task.")
    finally:
        agent.cleanup()
    steps = [s for s in agent.memory.steps if isinstance(s, ActionStep)]
    assert len(steps) == len(actions), steps
    assert [s.error for s in steps] == [None] * len(actions)
    return answer, steps


def _last_created(served: Server) -> dict[str, Any]:
    made = [r for r in read_records(served.cfg.audit_log) if r["event"] == "sandbox.created"]
    assert made, "no sandbox.created record"
    return dict(made[-1]["details"])


def _live(served: Server) -> list[Any]:
    r = httpx.get(f"{served.url}/v1/sandboxes", headers=served.headers(), timeout=30)
    assert r.status_code == 200, r.text
    return list(r.json())


NUMPY_PIL_CELL = """\
import sys
import numpy as np
from PIL import Image
a = (np.arange(32 * 64) % 256).astype(np.uint8).reshape(32, 64)
img = Image.fromarray(a)
print("size", img.size, "sum", int(np.asarray(img).sum()), "mode", img.mode)
print("numpy", np.__file__)
print("python", sys.executable, "%d.%d" % sys.version_info[:2])
img
"""


def test_a_code_agent_runs_numpy_and_pil_from_the_template(on_tier: Server, backend: str) -> None:
    """Step 1 computes with numpy and PIL and ends with the image, which comes
    back as E2B's PNG result (smolagents decodes it); step 2 answers from the
    state the kernel kept."""
    answer, steps = _run(
        NUMPY_PIL_CELL,
        'final_answer({"size": list(img.size), "sum": int(a.sum()), "mode": img.mode})',
    )

    assert answer == {"size": [64, 32], "sum": 261120, "mode": "L"}
    logs = steps[0].observations or ""
    assert logs.startswith("Execution logs:\nsize (64, 32) sum 261120 mode L\n"), logs
    # numpy is Debian's, from the template; the kernel ran on its python3.
    assert "numpy /usr/lib/python3/dist-packages/numpy/__init__.py\n" in logs, logs
    assert "python /usr/bin/python3 3.11\n" in logs, logs
    # The cell's value, the image, as the executor read it: a PNG made in the sandbox.
    image = steps[0].action_output
    assert isinstance(image, PIL.Image.Image), image
    assert (image.format, image.size, image.mode) == ("PNG", (64, 32), "L")
    assert image.tobytes() == bytes(i % 256 for i in range(32 * 64))
    created = _last_created(on_tier)
    assert created["backend"] == backend
    assert str(created["template"]).startswith(f"{STORE_TEMPLATE}@sha256:"), created
    assert _live(on_tier) == []  # agent.cleanup() killed the sandbox
    assert not on_tier.errors(), on_tier.errors()


def test_the_agent_code_cannot_write_the_template_or_reach_the_host(
    on_tier: Server, backend: str
) -> None:
    """Harmless: a file in /workspace is written and read back.  Malicious: a
    write into the template's numpy, and a connection to serve itself on the
    host's 127.0.0.1, are refused; the cell gets the plain OS errors."""
    port = int(on_tier.url.rsplit(":", 1)[1])
    answer, _ = _run(f"""\
import socket
with open("/workspace/ok.txt", "w") as f:
    f.write("mine")
out = {{"ok": open("/home/user/ok.txt").read()}}
try:
    open("/usr/lib/python3/dist-packages/numpy/evil.py", "w")
except OSError as e:
    out["write"] = str(e)
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=5)
except OSError as e:
    out["connect"] = str(e)
final_answer(out)
""")
    assert answer == {
        "ok": "mine",
        "write": f"{WRITE_REFUSED[backend]}: '/usr/lib/python3/dist-packages/numpy/evil.py'",
        "connect": "[Errno 111] Connection refused",
    }
    assert not on_tier.errors(), on_tier.errors()


def test_an_error_reaches_the_model_as_the_cells_traceback(on_tier: Server) -> None:
    """A failing action: the model is shown the cell's traceback, from the cell
    on (with its line), not the kernel's frames; the next action still runs in
    the same kernel."""
    model = ScriptedModel(["x = 41\ny = 1 / 0", "final_answer(x + 1)"])
    agent = CodeAgent(tools=[], model=model, executor_type="e2b", max_steps=2,
                      executor_kwargs=EXECUTOR_KWARGS)  # fmt: skip
    try:
        answer = agent.run("Do the task.")
    finally:
        agent.cleanup()
    assert answer == 42
    steps = [s for s in agent.memory.steps if isinstance(s, ActionStep)]
    err = str(steps[0].error)
    assert (
        "ZeroDivisionError\ndivision by zero\n"
        "Traceback (most recent call last):\n"
        '  File "<cell>", line 2, in <module>\n'
        "    y = 1 / 0\n"
        "         ~~^~~\n"
        "ZeroDivisionError: division by zero\n"
    ) in err, err
    assert "<string>" not in err
    assert not on_tier.errors(), on_tier.errors()


def test_the_template_kernel_gives_e2b_result_shapes(on_tier: Server) -> None:
    """What E2B's code interpreter returns, through the unmodified
    ``e2b_code_interpreter`` SDK on the template: a DataFrame's HTML, a PIL
    image's PNG, ``display()`` results, and a matplotlib plot as a PNG result
    after the cell (``plt.show()`` under the template's Agg backend)."""
    import base64
    import io

    from e2b_code_interpreter import Sandbox

    sb = Sandbox.create(timeout=120)
    try:
        ex = sb.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2]})")
        assert ex.error is None, ex.error
        [r] = ex.results
        assert r.is_main_result and r.text == "   a\n0  1\n1  2"
        assert r.html is not None and "<table" in r.html and "<td>2</td>" in r.html

        ex = sb.run_code(
            "import matplotlib.pyplot as plt\n"
            "display('before')\n"
            "plt.plot([1, 2, 3], [2, 4, 1])\n"
            "plt.show()\n"
            "print(plt.get_backend())"
        )
        assert ex.error is None, ex.error
        assert ex.logs.stdout == ["agg\n"]  # matplotlib's name for it: the template's MPLBACKEND
        first, plot = ex.results
        assert (first.is_main_result, first.text, first.png) == (False, "'before'", None)
        assert not plot.is_main_result and plot.text == "<Figure size 640x480 with 1 Axes>"
        shown = PIL.Image.open(io.BytesIO(base64.b64decode(plot.png or "")))
        assert shown.format == "PNG" and shown.size[0] > 300
        # shown figures are closed, as IPython's inline backend does
        assert sb.run_code("len(plt.get_fignums())").results[0].text == "0"

        # The cell's code can forge frames (the nonce is in the kernel's argv):
        # a result with a format E2B's Result does not have, or a format that
        # is not a string, is plain output, never a result.
        ex = sb.run_code(
            "import sys\n"
            'for body in (\'{"type": "result", "text": "x", "formats": {"exe": "MZ"}}\',\n'
            '             \'{"type": "result", "text": "x", "formats": {"png": 7}}\'):\n'
            "    sys.__stdout__.write('\\x1e' + sys.argv[1] + body + '\\n')\n"
            "sys.__stdout__.flush()"
        )
        assert ex.error is None and ex.results == [], (ex.error, ex.results)
        out = "".join(ex.logs.stdout)
        assert '"formats": {"exe": "MZ"}' in out and '"formats": {"png": 7}' in out, out
    finally:
        sb.kill()
    assert not on_tier.errors(), on_tier.errors()
