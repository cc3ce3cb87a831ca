"""glassroom on a Ray cluster: many hosts, one front door (docs/operations.md, "The fleet").

* a **host agent** per node (``_agent``): the single-host service, unchanged;
* **placement** by what a sandbox's policy asks (``_placement``), through
  Ray's resource scheduling: a node without the tier is never chosen;
* the **front door** (``_front``): the own, E2B APIs, each call routed to the
  node that holds the sandbox; tenants and caps fleet-wide;
* **node loss** (``_nodes``): ``sandbox.lost``, clear errors, reaper on rejoin;
* the fleet's **audit** (``_audit``): every node's chain verified, heads anchored
  centrally;
* **batches** (``_batch``): :func:`run_batch` for rollouts.

Importing this package does not import Ray; only starting the front door does.
"""

from __future__ import annotations

from ._batch import CommandOutcome, Progress, Task, TaskResult, iter_batch, run_batch

__all__ = ["CommandOutcome", "Progress", "Task", "TaskResult", "iter_batch", "run_batch"]
