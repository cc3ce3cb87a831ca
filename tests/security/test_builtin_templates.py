"""The built-in templates, ``base`` and ``code-interpreter`` (issue 15), on every tier.

scripts/setup.sh builds them from their recipes (Debian bookworm through
glassroom's egress proxy); the suite uses them where setup put them.
Harmless: E2B base's tools do their work (bash, coreutils, git, curl, tar,
base64, python3 with pip, node with npm), and the code interpreter's data
stack (numpy, pandas, matplotlib, Pillow) computes and draws.  Malicious,
each with its exact error: Debian's setuid ``su`` and ``passwd`` have no bit
and no effect, the tree is read-only, a template program that tools.allow
does not list does not run, and there is still no network.
"""

from __future__ import annotations

import os
import stat

import pytest

from glassroom import Sandbox
from glassroom._config import template_dir
from glassroom.templates import BUILTINS, TemplateStore
from glassroom.templates._builtin import current

TIERS = ["namespaces", "gvisor", "microvm"]
BASE_TOOLS = ["bash", "sh", "git", "curl", "tar", "base64", "python3", "node", "npm", "ls",
              "cat", "su", "id", "env", "gzip", "head", "cut"]  # fmt: skip
#: Room for npm and numpy/pandas/matplotlib under TCG on a slow machine (60 s by default).
RES = {"memory_mib": 1024, "max_runtime_s": 600}


@pytest.fixture(scope="module")
def store() -> TemplateStore:
    s = TemplateStore(template_dir())
    missing = [n for n in BUILTINS if current(s, n) is None]
    assert not missing, (f"built-in templates {missing} are missing or stale in {s.root}: "
                         "run `glassroom template builtin` (scripts/setup.sh does)")  # fmt: skip
    return s


@pytest.fixture(params=TIERS)
def tier(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_the_builtins_come_from_their_recipes(store: TemplateStore) -> None:
    for name in BUILTINS:
        t = store.get(name)
        assert t.meta.source["from"] == "debian:bookworm"
        assert {"git", "curl", "tar", "python3-pip", "nodejs", "npm"} <= set(t.meta.source["packages"])
        assert t.meta.dropped.get("setuid/setgid bits", 0) > 0  # su, mount, passwd ...
    ci = store.get("code-interpreter")
    assert {"python3-numpy", "python3-pandas", "python3-matplotlib", "python3-pil"} <= set(
        ci.meta.source["packages"])
    assert ci.meta.env["MPLBACKEND"] == "Agg"


def test_base_has_what_e2b_base_offers(store: TemplateStore, tier: str) -> None:
    script = (
        "set -e; cd /workspace; git init -q r; cd r; echo hi > f; git add f; "
        "git -c user.email=a@b -c user.name=a -c maintenance.auto=false commit -qm one; git log --format=%s; "
        "curl --version | head -1 | cut -d' ' -f1; tar czf /tmp/w.tgz -C /workspace r; "
        "base64 /tmp/w.tgz | head -c 4; echo; python3 -m pip --version | cut -d' ' -f1; "
        "node -e 'console.log(6*7)'; npm --version >/dev/null && echo npm-ok"
    )
    with Sandbox({"template": "base", "tools": {"allow": BASE_TOOLS}, "resources": RES},
                 backend=tier) as sb:  # fmt: skip
        r = sb.run(["bash", "-c", script])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines() == ["one", "curl", "H4sI", "pip", "42", "npm-ok"]


def test_the_code_interpreter_computes_and_draws(store: TemplateStore, tier: str) -> None:
    code = (
        "import numpy as np, pandas as pd, matplotlib.pyplot as plt\n"
        "from PIL import Image\n"
        "a = np.arange(12).reshape(3, 4)\n"
        "df = pd.DataFrame(a, columns=list('wxyz'))\n"
        "plt.plot(df['w']); plt.savefig('/workspace/p.png')\n"
        "im = Image.open('/workspace/p.png')\n"
        "print(int(a.sum()), int(df['z'].sum()), im.format, im.size[0] > 0)\n"
    )
    with Sandbox({"template": "code-interpreter", "tools": {"allow": ["python3"]},
                  "resources": RES}, backend=tier) as sb:  # fmt: skip
        r = sb.run(["python3", "-c", code], timeout_s=240)
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "66 21 PNG True\n"


def test_setuid_programs_of_debian_have_no_bit_and_no_effect(
    store: TemplateStore, tier: str
) -> None:
    t = store.get("base")
    for prog in ("usr/bin/su", "usr/bin/passwd", "usr/bin/newgrp", "usr/lib/openssh/ssh-keysign"):
        mode = os.lstat(t.rootfs / prog).st_mode
        assert stat.S_ISREG(mode) and not mode & (stat.S_ISUID | stat.S_ISGID), prog
    with Sandbox({"template": "base", "tools": {"allow": BASE_TOOLS}}, backend=tier) as sb:
        r = sb.run(["bash", "-c", "su -c id root </dev/null; echo su=$?; id -u"])
    # namespaces/gVisor: root is not in the sandbox's passwd; microVM: no password
    assert r.stdout.splitlines() == ["su=1", "1000"], (r.stdout, r.stderr)
    assert ("user root does not exist" in r.stderr
            or "su: Authentication failure" in r.stderr), r.stderr  # fmt: skip


RO_ERROR = {"namespaces": "Read-only file system", "gvisor": "Permission denied",
            "microvm": "Read-only file system"}  # fmt: skip


def test_the_builtin_tree_is_read_only(store: TemplateStore, tier: str) -> None:
    with Sandbox({"template": "base", "tools": {"allow": BASE_TOOLS}}, backend=tier) as sb:
        r = sb.run(["bash", "-c", "echo x > /usr/bin/git"])
        assert r.exit_code != 0 and RO_ERROR[tier] in r.stderr, r.stderr
        r = sb.run(["bash", "-c", "echo 'user::0:0::/:/bin/sh' >> /etc/passwd"])
        assert r.exit_code != 0 and r.stderr, r.stderr
    store.verify("base")


def test_a_program_tools_allow_does_not_list_does_not_run(store: TemplateStore,
                                                          tier: str) -> None:  # fmt: skip
    with Sandbox({"template": "base", "tools": {"allow": ["bash"]}}, backend=tier) as sb:
        ok = sb.run(["bash", "-c", "echo fine"])
        r = sb.run(["bash", "-c", "/usr/bin/perl -e 'print 1'"])
    assert ok.exit_code == 0 and ok.stdout == "fine\n"
    assert r.exit_code == 126 and "Permission denied" in r.stderr, r.stderr


def test_there_is_still_no_network(store: TemplateStore, tier: str) -> None:
    with Sandbox({"template": "base", "tools": {"allow": BASE_TOOLS}}, backend=tier) as sb:
        ok = sb.run(["curl", "-sS", "-o", "/dev/null", "file:///etc/os-release"])
        r = sb.run(["curl", "-sS", "-m", "3", "http://127.0.0.1:9/"])
    assert ok.exit_code == 0, ok.stderr
    assert r.exit_code == 7 and "Failed to connect" in r.stderr, r.stderr
