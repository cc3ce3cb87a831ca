"""The guest kernel's config fragment, and the check that it held.

Kconfig drops an option silently when its dependencies are unmet; the
builder must notice and refuse, or a kernel without Landlock would boot as
if it had it."""

from __future__ import annotations

from glassroom.backends.microvm import kernel

#: What the in-guest walls stand on; none of it may leave the fragment.
WALLS = {
    "CONFIG_SECURITY_LANDLOCK": "y",
    "CONFIG_SECCOMP_FILTER": "y",
    "CONFIG_MEMCG": "y",
    "CONFIG_CGROUP_PIDS": "y",
    "CONFIG_MULTIUSER": "y",
    "CONFIG_MODULES": "n",
    "CONFIG_BLK_DEV_INITRD": "n",
}


def _dot_config(options: dict[str, str]) -> str:
    lines = []
    for key, value in options.items():
        lines.append(f"# {key} is not set" if value == "n" else f"{key}={value}")
    return "\n".join(lines) + "\n"


def test_the_fragment_holds_the_walls() -> None:
    wanted = kernel.wanted_options()
    for key, value in WALLS.items():
        assert wanted.get(key) == value, key
    assert "landlock" in wanted["CONFIG_LSM"].strip('"').split(",")


def test_a_config_that_holds_every_line_passes() -> None:
    assert kernel.unmet(_dot_config(kernel.wanted_options())) == []


def test_a_dropped_option_is_named() -> None:
    wanted = dict(kernel.wanted_options())
    del wanted["CONFIG_SECURITY_LANDLOCK"]  # as Kconfig leaves it out: absent = n
    assert kernel.unmet(_dot_config(wanted)) == ["CONFIG_SECURITY_LANDLOCK=y (got n)"]


def test_a_wrong_value_and_an_unwanted_yes_are_named() -> None:
    wanted = dict(kernel.wanted_options())
    wanted["CONFIG_LSM"] = '"yama"'
    wanted["CONFIG_MODULES"] = "y"
    bad = kernel.unmet(_dot_config(wanted))
    assert 'CONFIG_LSM="landlock,yama" (got "yama")' in bad
    assert "CONFIG_MODULES=n (got y)" in bad
    assert len(bad) == 2


def test_the_digest_follows_the_fragment() -> None:
    assert len(kernel.config_digest()) == 12
    assert kernel.config_digest() == kernel.config_digest()
