"""The policy: what a sandbox may see, write, run and reach, and its limits.

A policy is a TOML file validated into an immutable :class:`Policy`.  Any
problem (bad TOML, unknown field, wrong type, out of bounds, dangerous path)
is a :class:`~glassroom.PolicyError` reading ``FILE:LINE: field: message``.
See ``docs/policy.md`` for the reference.
"""

from __future__ import annotations

from glassroom.policy._compile import backend_for, compile
from glassroom.policy._load import (
    PolicyValidationError,
    default_policy,
    load_policy,
    parse_policy,
    validate_policy,
)
from glassroom.policy._model import (
    FilesystemPolicy,
    NetworkPolicy,
    Policy,
    ResourcesPolicy,
    ToolsPolicy,
)

__all__ = [
    "FilesystemPolicy",
    "NetworkPolicy",
    "Policy",
    "PolicyValidationError",
    "ResourcesPolicy",
    "ToolsPolicy",
    "backend_for",
    "compile",
    "default_policy",
    "load_policy",
    "parse_policy",
    "validate_policy",
]
