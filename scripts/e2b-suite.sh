#!/usr/bin/env bash
# E2B parity, measured by E2B's own Python SDK tests (issue 16, docs/service.md).
#
#   scripts/e2b-suite.sh TESTS_DIR [PYTEST_ARGS...]
#
# TESTS_DIR is `packages/python-sdk/tests` of github.com/e2b-dev/E2B, extracted
# outside this repository (E2B's code is never copied into the project), e.g.
#   git --git-dir=E2B.git archive HEAD packages/python-sdk/tests | tar -x -C /tmp/e2b
#   scripts/e2b-suite.sh /tmp/e2b/packages/python-sdk/tests
# Use the commit whose SDK version matches `.venv/bin/pip show e2b` best.
#
# It starts `glassroom serve` on 127.0.0.1 with a fresh key, state and data dir,
# points the unmodified e2b SDK at it (E2B_API_URL, E2B_SANDBOX_URL,
# E2B_API_KEY), runs the sandbox, api and git tests (or the PYTEST_ARGS paths /
# -k given) with a per-test timeout, minus the tests listed with a reason in
# scripts/e2b-suite-exclude.txt, and ends with
#   N passed, M failed
#   S skipped, X excluded
# Failing test ids go to $E2B_SUITE_OUT (default: a temp dir, printed).
# Env: E2B_SUITE_TIMEOUT (seconds per test, default 30, as E2B's own pytest.ini);
#      E2B_SUITE_RISK=medium|high runs every sandbox on that tier (gvisor, microvm)
#      instead of the default template's (low: namespaces).
set -euo pipefail

if [[ $# -lt 1 || ! -f "$1/conftest.py" ]]; then
  echo "usage: $0 PATH_TO_E2B_PYTHON_SDK_TESTS [PYTEST_ARGS...]" >&2
  echo "  (the folder with E2B's conftest.py: packages/python-sdk/tests)" >&2
  exit 2
fi
tests=$(cd "$1" && pwd)
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
py="$repo/.venv/bin/python"
exclude_file="$repo/scripts/e2b-suite-exclude.txt"
timeout_s=${E2B_SUITE_TIMEOUT:-30}

# The suite's own test dependencies (the [test] extra has them); idempotent.
if ! "$py" -c 'import pytest_timeout, pytest_asyncio' 2>/dev/null; then
  "$repo/.venv/bin/pip" install -q 'pytest-timeout>=2.4,<3' 'pytest-asyncio>=1.3,<2'
fi

# E2B_SUITE_NETNS=1 (root): serve and the suite run in a fresh network
# namespace with no route out, where the network tests' hosts are local
# (scripts/e2b-suite-netns.sh).
if [[ ${E2B_SUITE_NETNS:-} == 1 && -z ${E2B_SUITE_IN_NETNS:-} ]]; then
  exec unshare --net --mount --propagation private \
    env E2B_SUITE_IN_NETNS=1 "$0" "$tests" "$@"
fi

# Fresh dirs, mode 0755: as root the sandbox uid must be able to search the
# state dir and its parents, so they go straight under /tmp (1777), never
# under a 0700 $TMPDIR.
base=/tmp
[[ $(id -u) -ne 0 ]] && base=${TMPDIR:-/tmp}
work=$(mktemp -d "$base/glassroom-e2b-suite.XXXXXX")
chmod 0755 "$work"
mkdir -m 0755 "$work/state" "$work/data"
out=${E2B_SUITE_OUT:-$work/out}
mkdir -p "$out"
netns_pid=
if [[ -n ${E2B_SUITE_IN_NETNS:-} ]]; then
  # shellcheck source=scripts/e2b-suite-netns.sh
  source "$repo/scripts/e2b-suite-netns.sh"
fi

port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
keyout=$("$repo/.venv/bin/glassroom" serve --new-key e2b-suite)
key=$(sed -n 's/^key: //p' <<<"$keyout")
{
  echo 'host = "127.0.0.1"'
  echo "port = $port"
  echo "data_dir = \"$work/data\""
  if [[ -n ${E2B_SUITE_RISK:-} ]]; then
    # The built-in base template's tools (git, where the host has it), on that tier.
    tools=$("$py" -c 'import json; from glassroom.interfaces.http._config import builtin_templates
print(json.dumps(builtin_templates()["base"].tools.allow))')
    printf 'risk = "%s"\n[tools]\nallow = %s\n[resources]\nmax_runtime_s = 3600\n' \
      "$E2B_SUITE_RISK" "$tools" >"$work/tier.toml"
    echo 'default_template = "tier"'
    printf '[templates.tier]\npolicy = "%s"\n' "$work/tier.toml"
    # The SDK always names its template (Sandbox() asks for "base"): that one too.
    [[ -n ${E2B_SUITE_IN_NETNS:-} ]] || printf '[templates.base]\npolicy = "%s"\n' "$work/tier.toml"
  fi
  if [[ -n ${E2B_SUITE_IN_NETNS:-} ]]; then
    printf '[templates.base]\npolicy = "%s"\n' "$netns_dir/base.toml"
  fi
  # E2B's tests start several sandboxes per test and in fixtures.
  sed "s/^\[tenants.e2b-suite\]$/[tenants.e2b-suite]\nmax_sandboxes = 40/" <<<"$keyout" | grep -v '^key: '
} >"$work/serve.toml"

serve_pid=
cleanup() {
  if [[ -n $serve_pid ]] && kill -0 "$serve_pid" 2>/dev/null; then
    kill -TERM "$serve_pid" 2>/dev/null || true
    wait "$serve_pid" 2>/dev/null || true
  fi
  if [[ -n $netns_pid ]]; then
    kill "$netns_pid" 2>/dev/null || true
  fi
  rm -rf "$work/state" "$work/data"
}
trap cleanup EXIT

GLASSROOM_STATE_DIR="$work/state" GLASSROOM_AUDIT_LOG="$work/data/audit.jsonl" \
  "$repo/.venv/bin/glassroom" serve --config "$work/serve.toml" >"$out/serve.log" 2>&1 &
serve_pid=$!
url="http://127.0.0.1:$port"
for _ in $(seq 1 100); do
  if "$py" -c "import urllib.request,sys; urllib.request.urlopen('$url/v1/health', timeout=1)" 2>/dev/null; then
    break
  fi
  kill -0 "$serve_pid" 2>/dev/null || { cat "$out/serve.log" >&2; exit 1; }
  sleep 0.2
done

# Exclusions: "test id  # reason"; the id is relative to TESTS_DIR.
deselect=()
excluded=0
while IFS= read -r line; do
  [[ $line == \#* ]] && continue
  id=${line%%#*}
  id=${id//[[:space:]]/}
  [[ -z $id ]] && continue
  deselect+=(--deselect "$id")
  excluded=$((excluded + 1))
done <"$exclude_file"

# E2B's pytest.ini settings, restated here (we do not use its files).
cat >"$work/pytest.ini" <<EOF
[pytest]
markers =
    skip_debug: skipped if E2B_DEBUG is set
asyncio_mode = auto
asyncio_default_fixture_loop_scope = session
asyncio_default_test_loop_scope = session
pythonpath = $tests
EOF

targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
  targets=("$tests/sync/sandbox_sync" "$tests/async/sandbox_async"
           "$tests/sync/api_sync" "$tests/async/api_async" "$tests/shared/git")
fi

# Only 127.0.0.1: no proxy, no E2B domain or access token, no debug mode.
set +e
env -u HTTP_PROXY -u HTTPS_PROXY -u http_proxy -u https_proxy -u ALL_PROXY \
  -u E2B_ACCESS_TOKEN -u E2B_DEBUG -u E2B_DOMAIN \
  NO_PROXY=127.0.0.1 E2B_API_URL="$url" E2B_SANDBOX_URL="$url" E2B_API_KEY="$key" \
  "$py" -m pytest -c "$work/pytest.ini" --rootdir "$tests" --import-mode=importlib \
  -p no:cacheprovider -p no:dotenv --timeout "$timeout_s" -q -rN --tb=line \
  --junitxml "$out/junit.xml" "${deselect[@]}" "${targets[@]}" >"$out/pytest.log" 2>&1
rc=$?
set -e
tail -n 3 "$out/pytest.log" >&2 || true

"$py" - "$out/junit.xml" "$excluded" "$out" <<'EOF'
import sys
import xml.etree.ElementTree as ET

junit, excluded, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
# One outcome per test: a test that fails and then errors in teardown is one failure.
outcome: dict[str, str] = {}
for case in ET.parse(junit).getroot().iter("testcase"):
    tid = f"{case.get('classname')}::{case.get('name')}"
    kinds = {child.tag for child in case}
    kind = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
    if outcome.get(tid) != "failed":
        outcome[tid] = kind
counts = {k: sum(1 for v in outcome.values() if v == k) for k in ("passed", "failed", "skipped")}
passed, failed, skipped = counts["passed"], counts["failed"], counts["skipped"]
with open(f"{out}/failing.txt", "w") as f:
    f.write("".join(t + "\n" for t in sorted(t for t, v in outcome.items() if v == "failed")))
print(f"failing tests: {out}/failing.txt, log: {out}/pytest.log")
print(f"{passed} passed, {failed} failed")
print(f"{skipped} skipped, {excluded} excluded")
EOF
# pytest's 1 (some tests failed) is the figure, not an error of this script.
[[ $rc -le 1 ]]
