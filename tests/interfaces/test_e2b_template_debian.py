"""E2B's ``Template().from_debian_image(...).apt_install([...])`` against
``glassroom serve``: the SDK's leading apt steps become the packages of a
Debian bootstrap (docs/templates.md), and the rest of its steps run on it.

Harmless: a template from Debian bookworm with ``jq`` installed by
``apt_install``, an env and a RUN that uses jq; a sandbox of it runs jq under
``bash -l``, as the SDK does.  Malicious: an ``apt_install`` after another
step (it cannot run in a RUN step), and one whose package list smuggles a
shell command, are each a 400 naming the step before anything is built.
The bootstrap uses the store's apt cache, which setup's built-ins filled.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from glassroom.audit import read_records

from .serve_helpers import Server, serving_e2b

e2b = pytest.importorskip("e2b")
from e2b import Sandbox, Template  # noqa: E402


@pytest.fixture(scope="module")
def served() -> Iterator[Server]:
    with serving_e2b(Path(tempfile.mkdtemp(prefix="glassroom-test-e2b-deb-"))) as srv:
        yield srv


def test_from_debian_image_with_apt_install(served: Server) -> None:
    t = (
        Template()
        .from_debian_image("bookworm")
        .apt_install(["jq"])
        .set_envs({"ANSWER": "42"})
        .run_cmd("jq -n '$ENV.ANSWER | tonumber + 1' > /opt/answer")
    )
    logs: list[str] = []
    info = Template.build(t, "deb-jq", on_build_logs=lambda e: logs.append(str(e)))
    try:
        sb = Sandbox.create("deb-jq", timeout=120)
        try:
            r = sb.commands.run("cat /opt/answer; jq --version; echo $ANSWER; "
                                ". /etc/os-release; echo $VERSION_CODENAME")  # fmt: skip
            assert r.stdout.splitlines() == ["43", "jq-1.6", "42", "bookworm"], r
        finally:
            sb.kill()
    finally:
        Template.delete(info.template_id) if hasattr(Template, "delete") else None
    recs = read_records(served.cfg.audit_log)
    boot = [r for r in recs if r["event"] == "template.bootstrap"]
    assert boot and boot[-1]["details"]["packages"] == ["jq"], boot
    fetched = [r for r in recs if r["event"] == "network.request"
               and r["sandbox"] == boot[-1]["sandbox"]]  # fmt: skip
    assert all(r["decision"] == "allow" for r in fetched)
    assert not served.errors(), served.errors()


@pytest.mark.parametrize(("make", "msg"), [
    (lambda: Template().from_debian_image("bookworm").run_cmd("true").apt_install(["jq"]),
     "step 2: RUN"),
    (lambda: Template().from_debian_image("bookworm").apt_install(["jq; touch /x"]),
     "step 1: 'jq;' is not a Debian package name"),
    (lambda: Template().from_debian_image("book worm"),
     "is not a Debian suite name"),
])  # fmt: skip
def test_bad_debian_builds_are_refused_before_building(served: Server, make: object,
                                                       msg: str) -> None:  # fmt: skip
    from e2b import BuildException
    from e2b.exceptions import InvalidArgumentException

    with pytest.raises((BuildException, InvalidArgumentException)) as info:
        Template.build(make(), "deb-bad")  # type: ignore[operator]
    assert msg in str(info.value), str(info.value)
    recs = read_records(served.cfg.audit_log)
    assert not any(r["event"] == "template.bootstrap" and r["details"]["packages"] == ["jq"]
                   and "deb-bad" in str(r) for r in recs)  # fmt: skip
    assert not served.errors(), served.errors()
