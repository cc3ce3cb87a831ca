"""Recipes ``FROM debian:SUITE`` with apt packages, and where their mirror comes from.

Harmless: a TOML ``apt`` step and a Dockerfile ``RUN apt-get install`` both
become the bootstrap's package list; the mirror is read from deb822 and
one-line apt sources, with the suite's -updates and -security entries.
Refused, each with its message: apt after another step, apt on a base that
is not Debian, a package or suite name that is not one, a Dockerfile RUN
that mixes apt with other commands, and a missing mmdebstrap (never a
silent fallback to another builder).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from glassroom import TemplateError
from glassroom.templates import _debian
from glassroom.templates._recipe import parse_dockerfile, parse_toml

CTX = Path("/nonexistent")


def test_toml_apt_steps_become_the_bootstrap_packages() -> None:
    r = parse_toml('from = "debian:bookworm"\n[[steps]]\napt = ["git", "curl"]\n'
                   '[[steps]]\napt = ["git", "jq=1.6-2.1"]\n[[steps]]\nrun = "true"\n',
                   "r.toml", CTX)  # fmt: skip
    assert r.base == "debian:bookworm"
    assert r.packages == ["git", "curl", "jq=1.6-2.1"]
    assert [s.kind for s in r.steps] == ["run"]
    assert r.digest.startswith("sha256:")


def test_dockerfile_apt_get_install_becomes_packages() -> None:
    r = parse_dockerfile(
        "FROM debian:bookworm\n"
        "RUN apt-get update && apt-get install -y --no-install-recommends git curl\n"
        "RUN DEBIAN_FRONTEND=noninteractive apt-get install -y jq && rm -rf /var/lib/apt/lists/*\n"
        "ENV A=1\n",
        "Dockerfile", CTX,
    )  # fmt: skip
    assert r.packages == ["git", "curl", "jq"]
    assert [s.kind for s in r.steps] == ["env"]


@pytest.mark.parametrize(("text", "msg"), [
    ('from = "debian:bookworm"\n[[steps]]\nrun = "true"\n[[steps]]\napt = ["git"]\n',
     "r.toml: steps[1]: apt steps come first"),
    ('from = "busy"\n[[steps]]\napt = ["git"]\n',
     "r.toml: steps[0]: apt packages need a Debian base (FROM debian:SUITE), not template:busy"),
    ('from = "debian:bookworm"\n[[steps]]\napt = ["Bad Name"]\n',
     "r.toml: steps[0]: 'Bad Name' is not a Debian package name"),
    ('from = "debian:Book/../worm"\n', "r.toml: from: 'Book/../worm' is not a Debian suite name"),
    ('from = "debian:bookworm"\n[[steps]]\napt = []\n',
     "r.toml: steps[0]: apt: a list of Debian package names"),
])  # fmt: skip
def test_bad_apt_recipes_are_refused(text: str, msg: str) -> None:
    with pytest.raises(TemplateError) as info:
        parse_toml(text, "r.toml", CTX)
    assert str(info.value).startswith(msg), str(info.value)
    assert info.value.rule == "template.recipe"


def test_a_dockerfile_run_mixing_apt_and_more_is_refused() -> None:
    with pytest.raises(TemplateError) as info:
        parse_dockerfile("FROM debian:bookworm\nRUN apt-get install -y git && git init /x\n",
                         "Dockerfile", CTX)  # fmt: skip
    assert str(info.value) == "Dockerfile:2: '&&' is not a Debian package name"


def test_the_mirror_comes_from_the_hosts_apt_sources(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
        "Components: main contrib\n")  # fmt: skip
    (tmp_path / "sources.list").write_text(
        "# a comment\ndeb [arch=amd64] http://other.example/debian trixie main\n"
        "deb file:/srv/local ./\n")  # fmt: skip
    host = _debian._host_sources((d, tmp_path / "sources.list"))
    lines = [s.line() for s in host]
    assert lines == [
        "deb http://mirror.example/debian bookworm main",
        "deb http://mirror.example/debian bookworm-updates main",
        "deb http://mirror.example/debian-security bookworm-security main contrib",
        "deb http://other.example/debian trixie main",
    ]
    same = [s.line() for s in _debian.sources_for("bookworm", host)]
    assert same == lines[:3]
    other = [s.line() for s in _debian.sources_for("sid", host)]
    assert other == ["deb http://mirror.example/debian sid main"]
    with pytest.raises(TemplateError) as info:
        _debian.sources_for("bookworm", [])
    assert "no Debian mirror in the host's apt sources" in str(info.value)
    assert info.value.rule == "template.debian"


def test_no_mmdebstrap_is_a_clear_refusal(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:  # fmt: skip
    monkeypatch.setattr(_debian.shutil, "which", lambda *a, **k: None)
    with pytest.raises(TemplateError) as info:
        _debian.bootstrap("bookworm", ["git"], tmp_path, audit_log=tmp_path / "a.jsonl",
                          progress=lambda _m: None)  # fmt: skip
    assert str(info.value).startswith("debian:bookworm: mmdebstrap is not installed")
    assert info.value.rule == "template.debian"
    assert not any(tmp_path.iterdir())
