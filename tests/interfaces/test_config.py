"""``glassroom serve``'s config file: tenants with hashed keys, templates as policies."""

from __future__ import annotations

from pathlib import Path

import pytest

from glassroom import PolicyError
from glassroom.interfaces.http import ServeConfig, hash_key, new_key


def test_config_file(tmp_path: Path) -> None:
    key = new_key()
    assert key.startswith("e2b_") and len(key) == 44
    (tmp_path / "job.toml").write_text(
        '[tools]\nallow = ["python3"]\n[resources]\nmax_runtime_s = 90\n'
    )
    cfg_file = tmp_path / "serve.toml"
    cfg_file.write_text(
        'host = "127.0.0.1"\nport = 9999\ndata_dir = "/tmp/x"\nmax_request_bytes = 1000\n'
        f'[tenants.alice]\nmax_sandboxes = 3\napi_keys_sha256 = ["{hash_key(key)}"]\n'
        '[templates.job]\npolicy = "job.toml"\n'
    )
    cfg = ServeConfig.load(cfg_file)
    assert (cfg.port, cfg.max_request_bytes, str(cfg.data_dir)) == (9999, 1000, "/tmp/x")
    t = cfg.tenant_for(key)
    assert t is not None and t.name == "alice" and t.max_sandboxes == 3
    assert cfg.tenant_for(new_key()) is None and cfg.tenant_for(None) is None
    assert key not in cfg_file.read_text()  # only the hash is stored
    assert cfg.templates["job"].resources.max_runtime_s == 90
    assert {"base", "code-interpreter-v1", "job"} <= set(cfg.templates)

    cfg_file.write_text("[templates.bad]\n")
    with pytest.raises(PolicyError, match=r"templates\.bad\.policy"):
        ServeConfig.load(cfg_file)
    cfg_file.write_text("not toml = = =")
    with pytest.raises(PolicyError, match="serve config"):
        ServeConfig.load(cfg_file)


def test_shutdown_bound_is_checked(tmp_path: Path) -> None:
    """The stop bound: default 10 s; a NaN, infinite, zero or huge bound is refused
    (each would turn "stops within" into "never" or "at once")."""
    cfg_file = tmp_path / "serve.toml"
    assert ServeConfig().shutdown_timeout_s == 10.0
    cfg_file.write_text("shutdown_timeout_s = 4.5\n")
    assert ServeConfig.load(cfg_file).shutdown_timeout_s == 4.5
    for bad in ("nan", "inf", "0", "-1", "301", '"soon"', "1e400"):
        cfg_file.write_text(f"shutdown_timeout_s = {bad}\n")
        with pytest.raises(PolicyError, match="shutdown_timeout_s"):
            ServeConfig.load(cfg_file)
