"""Tools and the guest image: a VM runs only what its image holds, so a plan
naming a tool the image lacks must not start (fail closed), naming the rule.

Before this check such a sandbox started, and then every command failed
("command not found"): the agent's Landlock rule for the absent tool could
not be built, so no task could enter its walls.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import records
from glassroom import BackendUnavailable, PlanError, Sandbox
from glassroom import _config as glassroom_config
from glassroom.backends.microvm import image, qemu


def _skip_without_qemu() -> None:
    if qemu.qemu_binary() is None:
        pytest.skip("qemu-system-x86_64 is not installed")


def _host_tool(name: str) -> str:
    found = shutil.which(name, path="/usr/bin:/bin")
    if found is None:
        pytest.skip(f"the host has no {name}")
    return os.path.realpath(found)


def test_a_tool_the_image_holds_starts(audit_log: Path) -> None:
    """git is in the image (copied from the host): it runs, with a writable HOME.
    git runs its own copy in git-core for helpers (``commit`` starts
    ``maintenance``), so that one is allowed too, as in serve's ``base``."""
    _skip_without_qemu()
    _host_tool("git")
    core = "/usr/lib/git-core/git"
    if not os.access(core, os.X_OK):
        pytest.skip(f"the host has no {core}")
    script = (
        "set -e; cd /home/user; git config --global user.name agent; "
        "git config --global user.email agent@example.com; "
        "git init -q -b main repo; cd repo; echo hi > a; git add a; "
        "git commit -q -m one; git log --format=%s; git config --global user.name"
    )
    with Sandbox({"risk": "high", "tools": {"allow": ["sh", "git", core, "echo"]}},
                 audit_log=audit_log) as sb:  # fmt: skip
        r = sb.run(["sh", "-c", script])
        sid = sb.id
    assert (r.exit_code, r.stdout, r.stderr) == (0, "one\nagent\n", "")
    created = [x for x in records(audit_log, sid) if x["event"] == "sandbox.created"]
    assert created and created[0]["details"]["backend"] == "microvm"
    assert os.path.realpath("/usr/bin/git") in created[0]["details"]["walls"]["landlock"]["tools"]


@pytest.mark.parametrize("backend", ["namespaces", "gvisor", "microvm"])
def test_the_base_template_runs_git_on_every_tier(backend: str, audit_log: Path) -> None:
    """serve's built-in ``base`` (E2B's name) with its git: config in the
    writable home, a commit, and a clone (git starts ``upload-pack`` from its
    git-core copy, which ``base`` allows with it)."""
    from glassroom.interfaces.http._config import builtin_templates

    _host_tool("git")
    if backend == "microvm":
        _skip_without_qemu()
    base = builtin_templates()["base"]
    assert "git" in base.tools.allow
    script = (
        "set -e; cd /home/user; git config --global user.name agent; "
        "git config --global user.email agent@example.com; "
        "git init -q -b main a; cd a; echo hi > f; git add f; git commit -q -m one; "
        "cd ..; git clone -q a b; cat b/f; git -C b log --format=%s; cat .gitconfig | head -1"
    )
    with Sandbox(base, backend=backend, audit_log=audit_log) as sb:
        r = sb.run(["sh", "-c", script])
    assert (r.exit_code, r.stdout, r.stderr) == (0, "hi\none\n[user]\n", ""), backend


def test_a_tool_the_image_lacks_is_refused(audit_log: Path) -> None:
    """dmesg is on the host but not in the image: no VM starts, the error and
    the audit record name the rule, and nothing is left behind."""
    _skip_without_qemu()
    path = _host_tool("dmesg")
    img = image.prepare()
    assert image.resolve_in_image(img, path) is None, "the image was meant to lack dmesg"
    state = glassroom_config.state_dir()
    before = set((state / "microvm").iterdir()) if (state / "microvm").exists() else set()
    with pytest.raises(PlanError) as exc:
        Sandbox({"risk": "high", "tools": {"allow": ["sh", "dmesg"]}}, audit_log=audit_log)
    want = (
        f"tools.allow[1]: dmesg ({path}) is not in the microvm guest image (it holds the "
        f"host's {', '.join(image.TOOL_PACKAGES)}); use a lower risk, or another tool"
    )
    assert str(exc.value) == want
    assert exc.value.rule == "tools.allow[1]"
    recs = records(audit_log)
    refused = [x for x in recs if x["event"] == "sandbox.refused"]
    assert len(refused) == 1, [x["event"] for x in recs]
    assert refused[0]["rule"] == "tools.allow[1]" and refused[0]["decision"] == "deny"
    assert refused[0]["details"]["error"] == want
    assert not [x for x in recs if x["event"] == "sandbox.created"]
    after = set((state / "microvm").iterdir()) if (state / "microvm").exists() else set()
    assert after == before  # no VM directory was made
    # The refusal is the tier's: the same tools run on the host's tiers.
    with Sandbox({"tools": {"allow": ["sh", "dmesg"]}}, backend="namespaces") as sb:
        assert sb.run(["sh", "-c", "command -v dmesg"]).exit_code == 0


def test_image_paths_resolve_through_the_images_own_links() -> None:
    """The image's links, not the host's: /bin/sh is found through /bin ->
    usr/bin and sh -> dash; a path only the host has, and a link loop, are not."""
    img = image.prepare()
    sh = image.resolve_in_image(img, "/bin/sh")
    assert sh is not None and sh.startswith("/usr/bin/")
    assert image.resolve_in_image(img, "/usr/bin/../bin/sh") == sh
    assert image.resolve_in_image(img, "/usr/bin/git") == "/usr/bin/git"
    assert image.resolve_in_image(img, "/usr/bin/dmesg") is None
    assert image.resolve_in_image(img, "/usr/bin") is None  # a directory is not a tool


def test_a_missing_or_foreign_manifest_refuses(tmp_path: Path) -> None:
    """No list of what the image holds: nothing can be checked, so nothing starts."""
    fake = image.Image(tmp_path / "k", None, tmp_path / "rootfs-x.ext4", "x", "r")
    with pytest.raises(BackendUnavailable) as exc:
        image.resolve_in_image(fake, "/bin/sh")
    assert exc.value.rule == "backend.microvm"
    assert "rootfs-x.files.json is unreadable" in str(exc.value)
    fake.manifest.write_text(json.dumps({"version": 99, "files": ["/bin/sh"], "links": {}}))
    with pytest.raises(BackendUnavailable, match=r"unreadable \(version 99\)"):
        image.resolve_in_image(fake, "/bin/sh")
    loop = {"version": image.MANIFEST_VERSION, "files": ["/a/x"], "links": {"/l": "/m", "/m": "l"}}
    fake.manifest.write_text(json.dumps(loop))
    assert image.resolve_in_image(fake, "/l/x") is None
    assert image.resolve_in_image(fake, "/a/x") == "/a/x"


def test_installing_a_tool_package_changes_the_image_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image copies the host's files: a tool package installed or upgraded
    after the image was built changes the root image's key, so it is built again."""
    monkeypatch.setattr(image, "DPKG_INFO", str(tmp_path))
    without = image._host_packages()
    (tmp_path / "git.list").write_text("/usr/bin/git\n")
    installed = image._host_packages()
    os.utime(tmp_path / "git.list", ns=(1, 1))  # an upgrade rewrites the list
    upgraded = image._host_packages()
    assert len({without, installed, upgraded}) == 3
    (tmp_path / "unrelated.list").write_text("/usr/bin/x\n")  # not a tool package
    assert image._host_packages() == upgraded
