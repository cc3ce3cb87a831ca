"""Templates from OCI images: layers, whiteouts, config, and hostile images.

Every image here is made by the test itself (no registry is reachable): an
OCI image layout (directory and tar) and a ``docker save`` tar.  Harmless:
layers apply in order, whiteouts and opaque directories remove what they
should, Env/WorkingDir/User/Entrypoint are kept, the same content is one
object.  Malicious: traversal, a write through a symlinked parent, a hard
link out of the image, a layer that does not match its digest, setuid bits
and device nodes, a bomb past the size bound: each refused or dropped, with
the message checked, and nothing left in the store.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from glassroom import TemplateError
from glassroom.templates import TemplateStore, import_oci

Entry = tuple[str, str, object]  # (kind, name, data/target/mode)


def _layer(entries: list[tuple]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            kind, name = e[0], e[1]
            ti = tarfile.TarInfo(name)
            if kind == "file":
                data = e[2] if isinstance(e[2], bytes) else str(e[2]).encode()
                ti.size, ti.mode = len(data), (e[3] if len(e) > 3 else 0o644)
                tf.addfile(ti, io.BytesIO(data))
                continue
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, e[2]
            elif kind == "hard":
                ti.type, ti.linkname = tarfile.LNKTYPE, e[2]
            elif kind == "chr":
                ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
            tf.addfile(ti)
    return buf.getvalue()


def _sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def _config(diff_ids: list[str]) -> bytes:
    return json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"],
                   "WorkingDir": "/app", "User": "1000:1000",
                   "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }).encode()  # fmt: skip


def oci_layout(dest: Path, layers: list[bytes], *, gz: bool = True) -> Path:
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(b: bytes) -> str:
        d = _sha(b)
        (blobs / d.split(":")[1]).write_bytes(b)
        return d

    stored = [gzip.compress(x, mtime=0) if gz else x for x in layers]
    cfg = _config([_sha(x) for x in layers])
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put(cfg), "size": len(cfg)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": put(b), "size": len(b)} for b in stored],
    }).encode()  # fmt: skip
    md = put(manifest)
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md,
         "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}))  # fmt: skip
    return dest


def docker_save(dest: Path, layers: list[bytes]) -> Path:
    cfg = _config([_sha(x) for x in layers])
    with tarfile.open(dest, "w") as tf:
        def add(name: str, b: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(b)
            tf.addfile(ti, io.BytesIO(b))

        add("cfg.json", cfg)
        names = []
        for i, b in enumerate(layers):
            add(f"l{i}/layer.tar", b)
            names.append(f"l{i}/layer.tar")
        add("manifest.json", json.dumps([{"Config": "cfg.json", "RepoTags": ["demo:1"],
                                          "Layers": names}]).encode())  # fmt: skip
    return dest


BASE = _layer([
    ("dir", "bin"), ("file", "bin/sh", "#!shell", 0o755), ("dir", "etc"),
    ("file", "etc/os-release", "ID=demo\n"), ("file", "etc/motd", "hello\n"),
    ("dir", "opt"), ("file", "opt/a", "a"), ("file", "opt/b", "b"),
    ("dir", "opt/sub"), ("file", "opt/sub/c", "c"),
    ("sym", "usr-link", "bin"), ("hard", "bin/sh2", "bin/sh"),
])  # fmt: skip
TOP = _layer([
    ("file", "etc/.wh.motd", ""),                      # remove a lower file
    ("file", "opt/new", "new"), ("file", "opt/.wh..wh..opq", ""),  # opaque after its own entry
    ("file", "bin/suid", "x", 0o4755), ("chr", "dev-null", None),
])  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> TemplateStore:
    return TemplateStore(tmp_path / "store")


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.mark.parametrize("form", ["layout-dir", "layout-tar", "docker-save"])
def test_layers_whiteouts_and_config(form: str, store: TemplateStore, tmp_path: Path) -> None:
    if form == "docker-save":
        image = docker_save(tmp_path / "img.tar", [BASE, TOP])
    else:
        image = oci_layout(tmp_path / "layout", [BASE, TOP])
        if form == "layout-tar":
            with tarfile.open(tmp_path / "layout.tar", "w") as tf:
                for p in sorted(image.rglob("*")):
                    tf.add(p, arcname=p.relative_to(image).as_posix(), recursive=False)
            image = tmp_path / "layout.tar"
    t = import_oci(image, store, "demo")
    root = t.rootfs
    assert _tree(root) == {
        "bin", "bin/sh", "bin/sh2", "bin/suid", "etc", "etc/os-release", "opt", "opt/new",
        "usr-link",
    }  # motd whited out; opt's lower entries gone, its own new file kept; no device
    assert (root / "bin" / "sh").read_text() == "#!shell"
    assert os.path.samefile(root / "bin" / "sh", root / "bin" / "sh2")
    assert os.readlink(root / "usr-link") == "bin"
    assert stat.S_IMODE((root / "bin" / "suid").stat().st_mode) & 0o6000 == 0
    assert t.meta.dropped == {"setuid/setgid bits": 1, "devices and FIFOs": 1}
    assert t.meta.env == {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    assert (t.meta.workdir, t.meta.user) == ("/app", "1000:1000")
    assert (t.meta.entrypoint, t.meta.cmd) == (["/bin/sh", "-c"], ["echo hi"])
    assert t.digest.startswith("sha256:") and t.meta.files == 5
    # read-only in the store, and it verifies
    assert not os.access(root / "etc" / "os-release", os.W_OK) or os.geteuid() == 0
    assert stat.S_IMODE((root / "etc" / "os-release").stat().st_mode) & 0o222 == 0
    store.verify("demo")


def test_same_content_is_one_object_and_rm(store: TemplateStore, tmp_path: Path) -> None:
    a = import_oci(oci_layout(tmp_path / "a", [BASE, TOP]), store, "one")
    b = import_oci(docker_save(tmp_path / "b.tar", [BASE, TOP]), store, "two")
    assert a.digest == b.digest and a.rootfs == b.rootfs
    assert [t.name for t in store.list()] == ["one", "two"]
    assert store.remove("one") and a.rootfs.exists()  # "two" still points at it
    assert store.remove("two") and not a.rootfs.exists()
    assert not store.remove("two")
    with pytest.raises(TemplateError, match=r"template 'two' was not found \(known: none\)"):
        store.get("two")


def test_a_changed_tree_fails_verify(store: TemplateStore, tmp_path: Path) -> None:
    t = import_oci(oci_layout(tmp_path / "a", [BASE]), store, "demo")
    f = t.rootfs / "etc" / "os-release"
    os.chmod(f.parent, 0o755)
    os.chmod(f, 0o644)
    f.write_text("ID=evil\n")
    with pytest.raises(TemplateError) as info:
        store.verify("demo")
    assert info.value.rule == "template.integrity"
    assert "changed on disk" in str(info.value)


HOSTILE = {
    "traversal": ([("file", "../../escape", "x")], "entry '../../escape' leaves the image's root"),
    "through a symlinked parent": (
        [("sym", "etc", "/tmp"), ("file", "etc/passwd", "root::0:0::/:/bin/sh")],
        "entry 'etc/passwd' goes through the symlink 'etc'"),
    "hard link out of the image": (
        [("hard", "shadow", "/etc/shadow")],
        "'shadow' hard-links to '/etc/shadow', which is not a regular file of the image"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers_are_refused(case: str, store: TemplateStore, tmp_path: Path) -> None:
    entries, message = HOSTILE[case]
    image = oci_layout(tmp_path / "img", [_layer(entries)])
    with pytest.raises(TemplateError) as info:
        import_oci(image, store, "bad")
    assert message in str(info.value) and info.value.rule == "template.import"
    assert store.list() == []
    assert not any((store.root / "staging").iterdir())  # nothing half-made is left
    assert not (tmp_path.parent / "escape").exists()


def test_a_layer_that_does_not_match_its_digest(store: TemplateStore, tmp_path: Path) -> None:
    image = oci_layout(tmp_path / "img", [BASE])
    manifest = json.loads((image / "index.json").read_text())["manifests"][0]["digest"]
    layer = json.loads((image / "blobs/sha256" / manifest.split(":")[1]).read_bytes())["layers"][0]
    blob = image / "blobs/sha256" / layer["digest"].split(":")[1]
    blob.write_bytes(gzip.compress(_layer([("file", "etc/os-release", "ID=swapped\n")])))
    with pytest.raises(TemplateError, match="blob does not match its digest"):
        import_oci(image, store, "bad")
    assert store.list() == []


def test_a_bomb_stops_at_the_bound(store: TemplateStore, tmp_path: Path) -> None:
    big = _layer([("file", "zeros", b"\0" * (3 << 20))])
    with pytest.raises(TemplateError, match="unpacks to more than 2 MiB"):
        import_oci(oci_layout(tmp_path / "img", [big]), store, "bomb", max_bytes=2 << 20)


def test_not_an_image(store: TemplateStore, tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    with pytest.raises(TemplateError, match="neither an OCI image layout"):
        import_oci(tmp_path / "x", store, "x")
    with pytest.raises(TemplateError, match="no such image"):
        import_oci(tmp_path / "missing", store, "x")
    with pytest.raises(TemplateError, match="must match"):
        import_oci(oci_layout(tmp_path / "ok", [BASE]), store, "Bad Name!")


def test_the_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    image = docker_save(tmp_path / "img.tar", [BASE, TOP])
    d = str(tmp_path / "store")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "glassroom.interfaces.cli", "template", *args,
                               "--dir", d], capture_output=True, text=True, timeout=60, check=False)  # fmt: skip

    r = cli("import", str(image), "--name", "demo")
    assert r.returncode == 0, r.stderr
    assert "unpacking layer 0 (l0/layer.tar)" in r.stderr and r.stdout.startswith("demo ")
    listed = json.loads(cli("list", "--json").stdout)
    assert [t["name"] for t in listed] == ["demo"] and listed[0]["workdir"] == "/app"
    assert cli("verify", "demo").stdout.startswith("demo: ok (sha256:")
    r = cli("show", "nope")
    assert r.returncode == 125 and "template 'nope' was not found (known: demo)" in r.stderr
    r = cli("import", str(tmp_path), "--name", "x")
    assert r.returncode == 125 and "neither an OCI image layout" in r.stderr
    assert cli("rm", "demo").returncode == 0
    assert "no templates in" in cli("list").stdout


# --- found by the attack review (docs/templates.md lists each outcome) -------


def test_whiteouts_of_nothing_are_refused(store: TemplateStore, tmp_path: Path) -> None:
    for i, bad in enumerate((".wh.", ".wh..", ".wh...")):
        image = oci_layout(tmp_path / f"img{i}", [BASE, _layer([("file", f"opt/{bad}", "")])])
        with pytest.raises(TemplateError, match="is not a whiteout of an entry"):
            import_oci(image, store, "bad")
    assert not any((store.root / "staging").iterdir())


def test_an_opaque_dir_hides_lower_content_at_any_depth(store: TemplateStore, tmp_path: Path) -> None:
    lower = _layer([("dir", "d"), ("dir", "d/sub"), ("file", "d/sub/secret", "s"), ("file", "d/x", "x")])
    upper = _layer([("file", "d/.wh..wh..opq", ""), ("dir", "d/sub"), ("file", "d/sub/new", "n")])
    t = import_oci(oci_layout(tmp_path / "img", [lower, upper]), store, "opq")
    assert _tree(t.rootfs) == {"d", "d/sub", "d/sub/new"}


def test_deep_paths_and_malformed_metadata_are_refused(store: TemplateStore, tmp_path: Path) -> None:
    deep = _layer([("file", "d/" * 200 + "f", "x")])
    with pytest.raises(TemplateError, match="is deeper than 128 levels"):
        import_oci(oci_layout(tmp_path / "deep", [deep]), store, "deep")
    image = docker_save(tmp_path / "m.tar", [BASE])
    with tarfile.open(image) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}  # type: ignore[union-attr]
    members["manifest.json"] = b'[{"Layers": []}]'  # no Config
    with tarfile.open(tmp_path / "m2.tar", "w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    with pytest.raises(TemplateError, match=r"malformed image metadata \(KeyError: 'Config'\)"):
        import_oci(tmp_path / "m2.tar", store, "m")


def test_a_link_target_cannot_spell_other_entries(tmp_path: Path) -> None:
    from glassroom.templates import tree_digest

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").symlink_to('y"]\n["l", "7a", "77')  # text that looks like more listing
    (b / "x").symlink_to("y")
    (b / "z").symlink_to("w")
    assert tree_digest(a)[0] != tree_digest(b)[0]


def test_bytes_past_the_tars_end_count_against_the_bound(store: TemplateStore, tmp_path: Path) -> None:
    tar = _layer([("file", "f", "x")]) + b"\0" * (70 << 20)  # a tar, then 70 MiB more
    with pytest.raises(TemplateError, match="unpacks to more than"):
        import_oci(oci_layout(tmp_path / "img", [tar]), store, "bomb", max_bytes=1 << 20)


def test_ld_so_preload_never_reaches_the_store(store: TemplateStore, tmp_path: Path) -> None:
    """The host's loader starts the init in the template's root and reads this
    file by fixed path, before any wall is up (tests/security/test_templates.py
    checks a tree changed on disk afterwards is refused)."""
    layer = _layer([("dir", "etc"), ("file", "etc/ld.so.preload", "/opt/evil.so\n"),
                    ("dir", "usr"), ("dir", "usr/etc"), ("sym", "usr/etc/ld.so.preload",
                                                         "/etc/ld.so.preload")])  # fmt: skip
    t = import_oci(oci_layout(tmp_path / "img", [layer]), store, "preload")
    assert not os.path.lexists(t.rootfs / "etc" / "ld.so.preload")
    assert t.meta.dropped == {"/etc/ld.so.preload": 1}
