"""``glassroom demo``: the main job, end to end, on the default backend.

A small "agent task" does real work in a fresh sandbox (writes a script,
runs it over data, lists its results), tries one thing its policy does not
allow, and then the sandbox's audit trail is printed.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from .. import _config
from .._sandbox import Sandbox
from ..audit import format_table, read_records, select, verify

AGENT_SCRIPT = """\
import csv, json, random, statistics
random.seed(7)
rows = [{"day": d, "latency_ms": round(random.gauss(120, 25), 1)} for d in range(1, 31)]
with open("latency.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["day", "latency_ms"]); w.writeheader(); w.writerows(rows)
vals = [r["latency_ms"] for r in rows]
p95 = sorted(vals)[int(0.95 * len(vals)) - 1]
report = {"days": len(vals), "mean": round(statistics.mean(vals), 1), "p95": p95,
          "anomalies": [r["day"] for r in rows if r["latency_ms"] > 160]}
json.dump(report, open("report.json", "w"), indent=1)
print("report:", json.dumps(report))
"""


def run_demo(audit_log: str | None = None) -> int:
    log = Path(audit_log or _config.audit_log_path())
    out = sys.stdout
    with Sandbox(audit_log=log) as sb:
        print(f"== sandbox {sb.id} on backend {sb.backend} (default policy) ==", file=out)
        sb.files.write("/workspace/analyze.py", AGENT_SCRIPT)
        step = sb.run(["python3", "analyze.py"])
        print(f"$ python3 analyze.py   -> exit {step.exit_code}\n{step.stdout.rstrip()}", file=out)
        ls = sb.run(["ls", "-l", "/workspace"])
        print(f"$ ls -l /workspace     -> exit {ls.exit_code}\n{ls.stdout.rstrip()}", file=out)
        print("$ (agent tries to plant a key in the host's /etc)", file=out)
        bad = sb.run(["sh", "-c", "echo 'ssh-ed25519 AAAA attacker' >> /etc/authorized_keys"])
        print(f"  -> exit {bad.exit_code}: {bad.stderr.strip()}", file=out)
        tool = next((t for t in ("curl", "wget", "perl") if shutil.which(t)), "perl")
        print(f"$ {tool} (not in tools.allow)", file=out)
        blocked = sb.run([tool, "--version"])
        print(f"  -> exit {blocked.exit_code}: {blocked.stderr.strip()}", file=out)
        for b in blocked.blocked:
            print(f"  blocked: {b.action} {b.target} by rule {b.rule}", file=out)
        sid = sb.id
    print(f"\n== audit trail of {sid} ({log}) ==", file=out)
    print(format_table(select(read_records(log), sandbox=sid)), file=out)
    res = verify(log)
    print(f"\naudit verify: {'ok' if res.ok else 'FAILED'} ({res.records} records)", file=out)
    good = step.exit_code == 0 and ls.exit_code == 0 and bad.exit_code != 0
    good = good and blocked.exit_code == 126 and res.ok
    return 0 if good else 1
