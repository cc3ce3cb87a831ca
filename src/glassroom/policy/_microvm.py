"""What the ``microvm`` tier cannot do with a policy, refused at compile time.

The guest has its own root image: host paths are not shared into it (files
move through the agent).  Risk "maximum" never gets a network device.  A rule that
would need either stops compilation with a ``PlanError`` naming it, rather
than running with the rule quietly meaning something else.
"""

from __future__ import annotations

from .._errors import PlanError
from ._model import Policy

#: Trees the guest image holds (copied from the host at the same paths);
#: a read path elsewhere would not exist inside.
IMAGE_ROOTS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib64")


def check(policy: Policy) -> None:
    for i, path in enumerate(policy.filesystem.write):
        raise PlanError(
            f"filesystem.write[{i}]: {path}: the microvm tier shares no host directory "
            "(move files with sb.files)",
            rule=f"filesystem.write[{i}]",
        )
    for i, path in enumerate(policy.filesystem.read if policy.template is None else ()):
        # (with a template the guest's root is the template: read paths bind nothing)
        if not any(path == r or path.startswith(r + "/") for r in IMAGE_ROOTS):
            raise PlanError(
                f"filesystem.read[{i}]: {path} is not in the microvm guest image "
                f"(it holds {', '.join(IMAGE_ROOTS)}); move files with sb.files",
                rule=f"filesystem.read[{i}]",
            )
    if policy.network.allow and policy.risk == "maximum":
        raise PlanError("network.allow: risk 'maximum' means no network device at all",
                        rule="network.allow")  # fmt: skip
