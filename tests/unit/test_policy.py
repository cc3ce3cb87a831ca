"""Policy loading and validation: each refusal has a harmless twin that loads."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from glassroom._errors import PolicyError
from glassroom.policy import (
    Policy,
    PolicyValidationError,
    _defaults,
    _paths,
    default_policy,
    load_policy,
    parse_policy,
    validate_policy,
)
from glassroom.policy._load import locate

VALID = """\
risk = "medium"

[filesystem]
read = ["/usr", "/etc/ssl/certs"]   # comment
write = ["/srv/data"]

[tools]
allow = ["python3", "sh", "/usr/bin/ls"]

[network]
allow = ["api.example.com"]

[resources]
cpus = 2
memory_mib = 1024
pids = 128
disk_mib = 256
max_runtime_s = 30.5
max_output_bytes = 4096
"""


def refused(text: str) -> PolicyValidationError:
    with pytest.raises(PolicyValidationError) as info:
        parse_policy(text, "p.toml")
    return info.value


# --- loading ---------------------------------------------------------------


def test_valid_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(VALID)
    p = load_policy(path)
    assert p.risk == "medium"
    assert p.filesystem.read == ["/usr", "/etc/ssl/certs"]
    assert p.filesystem.write == ["/srv/data"]
    assert p.tools.allow == ["python3", "sh", "/usr/bin/ls"]
    assert p.network.allow == ["api.example.com"]
    assert p.resources.cpus == 2.0 and isinstance(p.resources.cpus, float)
    assert p.resources.max_runtime_s == 30.5


def test_missing_file() -> None:
    with pytest.raises(PolicyError) as info:
        load_policy("/nonexistent/p.toml")
    assert str(info.value) == (
        "/nonexistent/p.toml: cannot read policy file: No such file or directory"
    )


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_bytes(b'risk = "low"\n# \xff\n')
    with pytest.raises(PolicyError, match=r"p\.toml:2: cannot read policy file: not valid UTF-8"):
        load_policy(path)


def test_empty_file_is_default_policy() -> None:
    assert parse_policy("") == default_policy() == Policy()


def test_sections_are_optional_and_fields_default() -> None:
    p = parse_policy('[resources]\ncpus = 0.5\n[filesystem]\nwrite = ["/srv/x"]\n')
    assert p.resources.cpus == 0.5
    assert p.resources.memory_mib == _defaults.MEMORY_MIB
    assert p.filesystem.read == list(_defaults.DEFAULT_READ)
    assert p.tools.allow == list(_defaults.DEFAULT_TOOLS)


def test_policy_is_frozen() -> None:
    p = default_policy()
    with pytest.raises(ValueError, match="frozen"):
        p.risk = "high"  # type: ignore[misc]


# --- error messages --------------------------------------------------------


def test_malformed_toml_gives_line() -> None:
    err = refused('risk = "low"\n[filesystem]\nread = ["/usr",, ]\n')
    assert str(err) == "p.toml:3: invalid TOML: Invalid value (column 16)"
    assert err.line == 3


def test_unknown_nested_field() -> None:
    err = refused('risk = "low"\n\n[filesystem]\nraed = ["/usr"]\n')
    assert str(err) == "p.toml:4: filesystem.raed: unknown field (allowed: read, write, unprotect)"
    assert (err.line, err.field) == (4, "filesystem.raed")


def test_unknown_top_level_field_and_section() -> None:
    allowed = "(allowed: risk, template, filesystem, tools, network, resources, credentials, audit)"
    assert str(refused("# x\nrisks = 'low'\n")) == f"p.toml:2: risks: unknown field {allowed}"
    assert str(refused("\n[networking]\n")) == f"p.toml:2: networking: unknown field {allowed}"


def test_unknown_resource_field() -> None:
    err = refused("[resources]\ncpus = 1\nmemory = 5\n")
    assert str(err).startswith("p.toml:3: resources.memory: unknown field (allowed: cpus, ")


def test_wrong_type() -> None:
    err = refused('[resources]\nmemory_mib = 512\n\ncpus = "abc"\n')
    assert str(err) == "p.toml:4: resources.cpus: Input should be a valid number"


def test_numbers_are_strict() -> None:
    assert str(refused("[resources]\npids = true\n")) == (
        "p.toml:2: resources.pids: Input should be a valid integer"
    )
    assert str(refused('[resources]\nmemory_mib = "512"\n')).startswith("p.toml:2: ")
    assert parse_policy("[resources]\nmax_runtime_s = 5\n").resources.max_runtime_s == 5.0


def test_wrong_type_list_item() -> None:
    err = refused('[filesystem]\nread = [\n  "/usr",\n  3,\n]\n')
    assert str(err) == "p.toml:4: filesystem.read[1]: Input should be a valid string"


def test_bad_risk() -> None:
    assert str(refused('risk = "extreme"\n')) == (
        "p.toml:1: risk: Input should be 'low', 'medium', 'high' or 'maximum'"
    )


@pytest.mark.parametrize(
    ("field", "bad", "good", "message"),
    [
        ("cpus", "0", "0.25", "Input should be greater than 0"),
        ("cpus", "65", "64", "Input should be less than or equal to 64"),
        ("memory_mib", "15", "16", "Input should be greater than or equal to 16"),
        ("memory_mib", "1048577", "1048576", "Input should be less than or equal to 1048576"),
        ("pids", "3", "4", "Input should be greater than or equal to 4"),
        ("pids", "32769", "32768", "Input should be less than or equal to 32768"),
        ("disk_mib", "0", "1", "Input should be greater than or equal to 1"),
        ("max_runtime_s", "0", "0.1", "Input should be greater than 0"),
        ("max_runtime_s", "86401", "86400", "Input should be less than or equal to 86400"),
        ("max_output_bytes", "1023", "1024", "Input should be greater than or equal to 1024"),
        ("max_output_bytes", str(2**30 + 1), str(2**30), "Input should be less than or equal"),
    ],
)
def test_resource_bounds(field: str, bad: str, good: str, message: str) -> None:
    parse_policy(f"[resources]\n{field} = {good}\n")
    assert str(refused(f"\n[resources]\n{field} = {bad}\n")).startswith(
        f"p.toml:3: resources.{field}: {message}"
    )


def test_several_errors_first_by_line_all_kept() -> None:
    err = refused('[tools]\nallow = [""]\n[resources]\npids = 1\ncpus = 0\n')
    assert str(err) == "p.toml:2: tools.allow[0]: tool name is empty"
    assert [str(e) for e in err.errors] == [
        "p.toml:2: tools.allow[0]: tool name is empty",
        "p.toml:4: resources.pids: Input should be greater than or equal to 4",
        "p.toml:5: resources.cpus: Input should be greater than 0",
    ]
    assert all(isinstance(e, PolicyError) for e in err.errors)


def test_error_without_source_or_text() -> None:
    with pytest.raises(PolicyError) as info:
        validate_policy({"filesystem": {"read": ["/"]}})
    assert str(info.value) == (
        "policy: filesystem.read[0]: '/' would expose the whole host filesystem"
    )


def test_dotted_and_inline_keys_are_located() -> None:
    assert str(refused('\nfilesystem.read = ["/"]\n')).startswith("p.toml:2: filesystem.read[0]")
    err = refused('\n\nfilesystem = { read = ["/usr"], write = ["/etc/x"] }\n')
    assert str(err).startswith("p.toml:3: filesystem.write[0]: '/etc/x' is beneath '/etc'")


def test_locator() -> None:
    text = (
        'a = """\nb = 1\n"""  # not a key\n'
        "[t]\n"
        "x.'y.z' = [1,\n  [2, 3],\n  { k = 4 }]\n"
        '[[arr]]\nn = "]"\n[[arr]]\nn = 2\n[arr.sub]\nm = 1\n'
    )
    lines = locate(text)
    assert lines[("a",)] == 1
    assert ("b",) not in lines
    assert lines[("t",)] == 4
    assert lines[("t", "x", "y.z")] == 5
    assert lines[("t", "x", "y.z", 1)] == 6
    assert lines[("t", "x", "y.z", 2, "k")] == 7
    assert lines[("arr", 0, "n")] == 9
    assert lines[("arr", 1, "n")] == 11
    assert lines[("arr", 1, "sub", "m")] == 13


# --- dangerous paths: each refused with a reason, each beside a harmless twin ----------


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("usr", "is not absolute"),
        ("", "path is empty"),
        ("/usr\0", "NUL byte"),
        ("/usr/../etc", "'..' component"),
        ("/usr/./lib", "'.' component"),
        ("/usr//lib", "contains '//'"),
        ("/usr/lib/", "trailing '/'"),
        ("/", "whole host"),
        ("/sys", "kernel and hardware"),
        ("/sys/kernel/debug", "is beneath '/sys'"),
        ("/proc", "reserved"),
        ("/proc/1/root", "reserved"),
        ("/dev/sda", "reserved"),
        ("/tmp", "reserved"),
        ("/workspace/x", "reserved"),
        ("/root", "administrator's home"),
        ("/root/.ssh", "is beneath '/root'"),
        ("/home", "users' homes"),
        ("/home/someone/.aws", "is beneath '/home'"),
        ("/run", "runtime sockets"),
        ("/run/docker.sock", "runtime sockets"),
        ("/var/run", "runtime sockets"),
        ("/var", "contains '/var/run'"),
        ("/boot", "kernel images"),
        ("/srv/docker.sock", "container runtime socket"),
        ("/srv/podman.sock", "container runtime socket"),
        ("/srv/containerd.sock", "container runtime socket"),
    ],
)
def test_dangerous_read_paths(bad: str, reason: str) -> None:
    assert _paths.read_problem("/usr/lib") is None  # the harmless twin
    err = refused(f"[filesystem]\nread = [{json.dumps(bad)}]\n")
    assert err.field == "filesystem.read[0]" and err.line == 2
    assert reason in str(err)
    # write refuses everything read refuses
    assert _paths.write_problem(bad)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("/", "whole host writable"),
        ("/usr", "'/usr' is refused: the host's system"),
        ("/usr/local/bin", "beneath '/usr'"),
        ("/etc", "'/etc'"),
        ("/etc/cron.d", "beneath '/etc'"),
        ("/bin", "'/bin'"),
        ("/sbin", "'/sbin'"),
        ("/lib", "'/lib'"),
        ("/lib64", "'/lib64'"),
        ("/var", "'/var'"),
        ("/opt", "'/opt'"),
        ("/srv", "'/srv'"),
        ("/boot/grub", "beneath '/boot'"),
        ("/home/someone", "beneath '/home'"),
    ],
)
def test_dangerous_write_paths(bad: str, reason: str) -> None:
    parse_policy('[filesystem]\nwrite = ["/srv/data", "/var/cache/app", "/opt/app/state"]\n')
    err = refused(f'[filesystem]\nread = []\nwrite = ["/srv/ok", {json.dumps(bad)}]\n')
    assert err.field == "filesystem.write[1]" and err.line == 3
    assert reason in str(err)


def test_home_dirs_refused_with_ancestors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/data/alice")
    parse_policy('[filesystem]\nread = ["/data/shared"]\n')
    for bad, why in [
        ("/data/alice", "'/data/alice' is refused"),
        ("/data/alice/.ssh", "is beneath '/data/alice'"),
        ("/data", "contains '/data/alice'"),
    ]:
        err = refused(f'[filesystem]\nread = ["{bad}"]\n')
        assert f"{why}: a user's home" in str(err)
    assert "contains '/data/alice'" in str(refused('[filesystem]\nwrite = ["/data"]\n'))


def test_root_home_of_service_users_does_not_matter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/")
    assert "/" not in _paths.home_dirs()
    assert "/nonexistent" not in [h for h in _paths.home_dirs() if _paths.is_within("/usr", h)]
    default_policy()


def test_symlink_to_dangerous_path_is_judged_by_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_paths, "_resolved", lambda p: [p, "/etc"])
    err = refused('[filesystem]\nwrite = ["/srv/link"]\n')
    assert "'/srv/link' resolves to '/etc' on this host" in str(err)


def test_socket_inside_listed_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os.path, "lexists", lambda p: p == "/srv/rt/docker.sock")
    assert "contains a container runtime socket" in str(
        refused('[filesystem]\nread = ["/srv/rt"]\n')
    )


def test_listed_in_both_read_and_write() -> None:
    parse_policy('[filesystem]\nread = ["/srv/a"]\nwrite = ["/srv/b"]\n')
    err = refused('[filesystem]\nread = ["/srv/a"]\nwrite = [\n"/srv/b",\n"/srv/a"]\n')
    assert str(err) == "p.toml:5: filesystem.write[1]: '/srv/a' is listed in both read and write"


@pytest.mark.parametrize("section", ["filesystem.read", "filesystem.write", "tools.allow"])
def test_duplicates(section: str) -> None:
    table, key = section.split(".")
    value = "/srv/a" if table == "filesystem" else "ls"
    err = refused(f'[{table}]\n{key} = ["{value}",\n "{value}"]\n')
    assert str(err) == f"p.toml:3: {section}[1]: '{value}' is listed twice (first at [0])"


def test_network_duplicates() -> None:
    err = refused('[network]\nallow = ["a.example", "a.example"]\n')
    assert err.field == "network.allow[1]"


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("", "tool name is empty"),
        ("*", "wildcards are not allowed"),
        ("py*", "wildcards are not allowed"),
        ("bin/ls", "bare name (found via PATH) or an absolute path"),
        ("./ls", "bare name (found via PATH) or an absolute path"),
        ("..", "may only contain"),
        ("l s", "may only contain"),
        ("ls;rm", "may only contain"),
        ("/usr/bin/../bin/ls", "'..' component"),
        ("/usr//bin/ls", "not normalized"),
        ("/workspace/tool", "allowing it would allow running anything"),
        ("/tmp/x", "allowing it would allow running anything"),
    ],
)
def test_bad_tools(bad: str, reason: str) -> None:
    parse_policy('[tools]\nallow = ["python3.11", "g++", "x-y_z", "/usr/bin/ls"]\n')
    err = refused(f"[tools]\nallow = [\n  {json.dumps(bad)},\n]\n")
    assert err.field == "tools.allow[0]" and err.line == 3
    assert reason in str(err)


def test_tool_inside_writable_path() -> None:
    err = refused('[filesystem]\nwrite = ["/srv/bin"]\n[tools]\nallow = ["ls", "/srv/bin/x"]\n')
    assert str(err).startswith("p.toml:4: tools.allow[1]: '/srv/bin/x' is beneath filesystem.")


@pytest.mark.parametrize(
    ("bad", "reason"), [("*", "whole network"), ("*.com", "top-level domain"), ("", "empty")]
)
def test_bad_network(bad: str, reason: str) -> None:
    parse_policy('[network]\nallow = ["*.example.com", "10.0.0.1"]\n')
    err = refused(f"[network]\nallow = [{json.dumps(bad)}]\n")
    assert err.field == "network.allow[0]" and reason in str(err)


# --- default policy, round-trip, digest --------------------------------------


def test_default_policy_is_documented_and_valid() -> None:
    p = default_policy()
    assert p.risk == "low"
    assert p.filesystem.read == ["/usr", "/etc/alternatives", "/etc/ssl/certs"]
    assert p.filesystem.write == []
    assert p.network.allow == []
    assert {"sh", "bash", "python3", "ls", "cat", "grep", "sed"} <= set(p.tools.allow)
    assert p.resources.model_dump() == {
        "cpus": 1.0,
        "memory_mib": 512,
        "pids": 64,
        "disk_mib": 512,
        "max_runtime_s": 60.0,
        "max_output_bytes": 1048576,
    }
    assert Policy.model_validate(p.model_dump()) == p
    assert p.tools.allow == list(_defaults.DEFAULT_TOOLS)


def test_to_toml_round_trip() -> None:
    for p in (default_policy(), parse_policy(VALID)):
        assert parse_policy(p.to_toml()) == p
    # Strings needing TOML escapes (network entries are host names now, so a
    # free-text field carries them: a tool path).
    odd = validate_policy({"tools": {"allow": ['/usr/bin/a"b\\c', "/usr/bin/é\x01\x7f"]}})
    assert parse_policy(odd.to_toml()) == odd
    rules = validate_policy({"network": {"allow": ["a.test"], "rules": [
        {"host": "a.test", "methods": ["GET"], "paths": ["/x/*"], "inspect_tls": True}]}})  # fmt: skip
    assert parse_policy(rules.to_toml()) == rules


def test_digest_stable_and_sensitive() -> None:
    a = default_policy()
    assert a.digest() == Policy().digest() == parse_policy(a.to_toml()).digest()
    assert len(a.digest()) == 64
    assert parse_policy('risk = "high"').digest() != a.digest()
    assert parse_policy("[resources]\ncpus = 1").digest() == a.digest()  # 1 == 1.0


def test_docs_examples() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "policy.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", doc, re.S)
    assert parse_policy(blocks[0]) == default_policy()
    for block in blocks[1:-1]:
        parse_policy(block)
    err = refused(blocks[-1])
    assert [e.field for e in err.errors] == [
        "filesystem.read[0]",
        "filesystem.write[0]",
        "tools.allow[0]",
        "network.allow[0]",
    ]
    for e in err.errors:
        comment = blocks[-1].splitlines()[e.line - 1 if e.line else 0].split("# ", 1)[1]
        assert comment.split(": ", 1)[1].rstrip("'") in str(e), (comment, str(e))


# --- credentials: env (the variable a credential is put in) ----------------

_CRED = '[[credentials]]\nname = "{name}"\nsource = "env:X"\ninject = "{inject}"\nenv = "{env}"\n'


def test_credential_env_names_the_variable() -> None:
    pol = parse_policy(_CRED.format(name="ai", inject="proxy", env="OPENAI_API_KEY")
                       + 'hosts = ["api.openai.test"]\n', "p.toml")  # fmt: skip
    assert pol.credentials[0].var == "OPENAI_API_KEY"
    plain = parse_policy('[[credentials]]\nname = "gh"\nsource = "env:X"\ninject = "env"\n')
    assert plain.credentials[0].var == "GLASSROOM_SECRET_GH"  # the default stays


@pytest.mark.parametrize(
    "env",
    ["PATH", "LD_PRELOAD", "PYTHONPATH", "https_proxy", "SSL_CERT_FILE", "GLASSROOM_SECRET_X",
     "NODE_OPTIONS", "BASH_ENV"],
)  # fmt: skip
def test_credential_env_refuses_variables_that_carry_walls(env: str) -> None:
    err = refused(_CRED.format(name="ai", inject="env", env=env))
    assert str(err) == (
        f"p.toml:5: credentials[0].env: env {env!r} is reserved: it carries a wall, "
        "decides what runs, or is glassroom's own; name another variable"
    )


def test_credential_env_bad_name_file_inject_and_twice() -> None:
    err = refused(_CRED.format(name="ai", inject="env", env="1BAD-NAME"))
    assert "p.toml:5: credentials[0].env: env '1BAD-NAME' must be a variable name" in str(err)
    err = refused(_CRED.format(name="ai", inject="file", env="OPENAI_API_KEY"))
    assert str(err) == (
        "p.toml:5: credentials[0].env: env names a variable: it applies to inject = 'env' "
        "or 'proxy', not 'file' (the file is /run/glassroom/secrets/ai)"
    )
    two = (_CRED.format(name="a", inject="env", env="OPENAI_API_KEY")
           + _CRED.format(name="b", inject="env", env="OPENAI_API_KEY"))  # fmt: skip
    err = refused(two)
    assert str(err) == (
        "p.toml:10: credentials[1].env: credentials[0] and credentials[1] both go in "
        "$OPENAI_API_KEY: one variable holds one credential"
    )
    # a custom name cannot take another credential's default variable either
    clash = (_CRED.format(name="a", inject="env", env="GH_TOKEN")
             + '[[credentials]]\nname = "gh_token"\nsource = "env:X"\ninject = "env"\n')  # fmt: skip
    parse_policy(clash)  # GLASSROOM_SECRET_GH_TOKEN and GH_TOKEN: two variables, fine
