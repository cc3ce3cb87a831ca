"""Building a template from a recipe (``glassroom template build``).

Harmless: a TOML recipe and its Dockerfile twin build the same template,
COPY, ENV, WORKDIR, RUN (in a build sandbox, audited) and USER all apply.
Malicious, each refused with its exact message and nothing left behind: a
COPY out of the recipe's directory or of a symlink, a RUN that fails, a RUN
that reaches for the network it was not given or for the host's files, a
setuid bit a RUN tries to make (seccomp answers EPERM; the builder would drop
one anyway), an unknown instruction.  The pairs a
template runs under are in test_templates.py (on a recipe-built one too).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from glassroom import TemplateError
from glassroom.templates import TemplateStore, build, import_oci, load_recipe
from glassroom.templates.testing import busybox_entries, docker_save_tar

APPLETS = ("sh", "ls", "cat", "echo", "mkdir", "chmod", "wget", "true", "false")


@pytest.fixture(scope="module")
def store() -> Iterator[TemplateStore]:
    base = Path(tempfile.mkdtemp(prefix="glassroom-test-tplbuild-"))
    os.chmod(base, 0o755)  # as root, the build sandbox's uid reads the store
    s = TemplateStore(base / "store")
    import_oci(docker_save_tar(base / "img.tar", busybox_entries(APPLETS)), s, "busy")
    try:
        yield s
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _recipe(tmp_path: Path, name: str, text: str) -> Path:
    d = tmp_path / "ctx"
    d.mkdir(exist_ok=True)
    (d / "app").mkdir(exist_ok=True)
    (d / "app" / "hello.txt").write_text("hello\n")
    (d / name).write_text(text)
    return d / name


TOML = """\
from = "busy"
[[steps]]
copy = ["app/", "/opt/app/"]
[[steps]]
env = { MODE = "prod" }
[[steps]]
workdir = "/opt/app"
[[steps]]
run = "cat hello.txt > made.txt && echo $MODE >> made.txt"
[[steps]]
user = "1000"
"""
DOCKERFILE = """\
FROM busy
# the same recipe, as a Dockerfile subset
COPY app/ /opt/app/
ENV MODE=prod
WORKDIR /opt/app
RUN cat hello.txt > made.txt && \\
    echo $MODE >> made.txt
USER 1000
"""


def test_toml_and_dockerfile_build_the_same(store: TemplateStore, tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    a = build(load_recipe(_recipe(tmp_path, "r.toml", TOML)), store, "from-toml", audit_log=log)
    b = build(load_recipe(_recipe(tmp_path, "Dockerfile", DOCKERFILE)), store, "from-docker",
              audit_log=log)  # fmt: skip
    assert a.digest == b.digest  # the same tree
    assert (a.rootfs / "opt" / "app" / "made.txt").read_text() == "hello\nprod\n"
    assert (a.meta.workdir, a.meta.user, a.meta.env["MODE"]) == ("/opt/app", "1000", "prod")
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    built = [r for r in recs if r["event"] == "template.built"]
    assert [r["details"]["name"] for r in built] == ["from-toml", "from-docker"]
    # each RUN was a sandbox of its own, audited like any task
    made = [r for r in recs if r["event"] == "sandbox.created"]
    assert len(made) == 2 and all(r["details"]["backend"] == "namespaces" for r in made)
    assert [r["details"]["template"] for r in made] == [
        "build:from-toml r.toml: steps[3]", "build:from-docker Dockerfile:6"]


def _refused(store: TemplateStore, path: Path, message: str) -> None:
    before = {t.name for t in store.list()}
    with pytest.raises(TemplateError) as info:
        build(load_recipe(path), store, "bad")
    assert message in str(info.value), str(info.value)
    assert {t.name for t in store.list()} == before
    assert not any((store.root / "staging").iterdir())  # the staging tree is gone


def test_copy_out_of_the_context_is_refused(store: TemplateStore, tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("host secret")
    r = _recipe(tmp_path, "Dockerfile", "FROM busy\nCOPY ../secret /opt/s\n")
    _refused(store, r, "Dockerfile:2: COPY ../secret: outside the recipe's directory")


def test_copy_of_a_symlink_is_refused(store: TemplateStore, tmp_path: Path) -> None:
    r = _recipe(tmp_path, "Dockerfile", "FROM busy\nCOPY link /opt/l\n")
    (r.parent / "link").symlink_to("/etc/passwd")
    _refused(store, r, "Dockerfile:2: COPY link: a symlink")
    (r.parent / "app" / "inner").symlink_to("/etc/shadow")
    r2 = _recipe(tmp_path, "D2", "FROM busy\nCOPY app /opt/app\n")
    _refused(store, r2, "a symlink or special file")


def test_a_failing_run_names_its_line(store: TemplateStore, tmp_path: Path) -> None:
    r = _recipe(tmp_path, "Dockerfile", "FROM busy\nRUN echo about to fail >&2; false\n")
    _refused(store, r, "Dockerfile:2: RUN exited 1: about to fail")


def test_a_run_has_no_network_and_no_host(store: TemplateStore, tmp_path: Path) -> None:
    r = _recipe(tmp_path, "Dockerfile",
                "FROM busy\nRUN wget -q -T 3 -O /opt/x http://127.0.0.1:9/\n")  # fmt: skip
    _refused(store, r, "Dockerfile:2: RUN exited 1")
    # the build sandbox's / is the tree: the host's files are not there
    r = _recipe(tmp_path, "D3", "FROM busy\nRUN cat /etc/hostname /root/.bashrc\n")
    _refused(store, r, "D3:2: RUN exited 1: cat: can't open '/etc/hostname'")


def test_setuid_bits_a_run_makes_are_dropped(store: TemplateStore, tmp_path: Path) -> None:
    r = _recipe(tmp_path, "Dockerfile",
                "FROM busy\nWORKDIR /opt\nRUN echo x > /opt/s && chmod 4755 /opt/s; true\n")  # fmt: skip
    t = build(load_recipe(r), store, "suid")
    assert stat.S_IMODE((t.rootfs / "opt" / "s").stat().st_mode) & 0o6000 == 0


@pytest.mark.parametrize(("text", "message"), [
    ("FROM busy\nADD x /y\n", "Dockerfile:2: unknown instruction 'ADD' (this subset: FROM, RUN, COPY, ENV, WORKDIR, USER)"),
    ("RUN true\n", "Dockerfile:1: RUN before FROM"),
    ("FROM busy\nFROM busy\n", "Dockerfile:2: a second FROM"),
    ("FROM ubuntu:noble\n", "Dockerfile:1: FROM 'ubuntu:noble': expected a template name, template:NAME, oci:PATH or debian:SUITE"),
    ("FROM busy\nRUN apt-get install -y git\n", "Dockerfile:2: apt packages need a Debian base (FROM debian:SUITE), not template:busy"),
    ("FROM busy\nCOPY --from=x a /b\n", "COPY options (--from, --chown ...) are not supported"),
    ("FROM busy\nWORKDIR relative\n", "WORKDIR 'relative' must be an absolute path"),
    ("FROM nope\n", "template 'nope' was not found"),
])  # fmt: skip
def test_bad_recipes(store: TemplateStore, tmp_path: Path, text: str, message: str) -> None:
    _refused(store, _recipe(tmp_path, "Dockerfile", text), message)


def test_bad_toml_recipes(store: TemplateStore, tmp_path: Path) -> None:
    _refused(store, _recipe(tmp_path, "r.toml", 'from = "busy"\nfrom_image = 1\n'),
             "r.toml: unknown key 'from_image'")  # fmt: skip
    _refused(store, _recipe(tmp_path, "r.toml", 'from = "busy"\n[[steps]]\nrun = 3\n'),
             "r.toml: steps[0]: run: a command line, or a list (exec form)")  # fmt: skip
