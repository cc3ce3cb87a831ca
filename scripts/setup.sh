#!/usr/bin/env bash
# Install what glassroom needs on a fresh Debian/Ubuntu host, into ./.venv.
# Idempotent: skips what is already there.  Run as root (apt) or with the
# packages already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v bwrap >/dev/null || need+=(bubblewrap)
[ -e /usr/lib/x86_64-linux-gnu/libseccomp.so.2 ] || [ -e /lib/x86_64-linux-gnu/libseccomp.so.2 ] \
  || ldconfig -p 2>/dev/null | grep -q libseccomp.so.2 || need+=(libseccomp2)
[ -x /usr/bin/python3 ] || need+=(python3)
[ -d /etc/ssl/certs ] || need+=(ca-certificates)
command -v ip >/dev/null || need+=(iproute2)
# The namespaces tier's compiled in-sandbox init (static C, src/glassroom/_sys/agent).
command -v cc >/dev/null || need+=(gcc)
dpkg -s libc6-dev >/dev/null 2>&1 || need+=(libc6-dev)
# The other tiers, needed by the tests (scripts/test.sh sets GLASSROOM_SETUP_TIERS=1);
# the demo runs on the default backend and skips them.
tiers=${GLASSROOM_SETUP_TIERS:-0}
if [ "$tiers" = 1 ]; then
# microvm tier: QEMU, a static busybox for the initramfs, mke2fs for the root image.
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
{ command -v busybox >/dev/null && ! ldd "$(command -v busybox)" >/dev/null 2>&1; } \
  || need+=(busybox-static)
command -v mke2fs >/dev/null || need+=(e2fsprogs)
# The guest image copies these from the host (E2B's base template has them):
# git, curl, and ncurses' tput.
for t in git:git curl:curl tput:ncurses-bin; do
  command -v "${t%%:*}" >/dev/null || need+=("${t#*:}")
done
# The purpose-built guest kernel is compiled from Debian's linux-source (about
# 3 minutes on 2 cores, once): a compiler and the kernel's build tools.
for t in make:make flex:flex bison:bison bc:bc xz:xz-utils; do
  command -v "${t%%:*}" >/dev/null || need+=("${t#*:}")
done
[ -e /usr/include/gelf.h ] || need+=(libelf-dev)
[ -e /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
# The gvisor tier: runsc, and a C compiler for its one-file compat shim (statx flags).
command -v runsc >/dev/null || need+=(runsc)
command -v cc >/dev/null || need+=(gcc)
# The audit sink tests send to a real syslog receiver (rsyslogd on 127.0.0.1).
command -v rsyslogd >/dev/null || [ -x /usr/sbin/rsyslogd ] || need+=(rsyslog)
# The built-in templates (base, code-interpreter) are Debian trees made by
# mmdebstrap in an unprivileged user namespace (templates/_debian.py).
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
# The console's end-to-end tests: Debian's headless chromium and its driver.
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "setup: please install: ${need[*]} (apt-get install ${need[*]})" >&2
    exit 1
  fi
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[test]"
# The compiled in-sandbox init of the namespaces and gvisor tiers, into
# /var/lib/glassroom/init (as root); a no-op while current.  Without it
# those tiers run the Python init, and say so in each sandbox's walls.
.venv/bin/glassroom init build >/dev/null
# The microvm guest kernel (built from Debian's kernel source, which is fetched with
# apt-get download and never installed), root image and booted-idle snapshot;
# cached, so a no-op when done.
if [ "$tiers" = 1 ]; then
  GLASSROOM_MICROVM_ALLOW_TCG=1 .venv/bin/glassroom microvm prepare >/dev/null
  # The built-in templates, from Debian's packages through glassroom's egress
  # proxy (about 5.5 minutes on 2 cores the first time; a no-op while current).
  .venv/bin/glassroom template builtin
fi
