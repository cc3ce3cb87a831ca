# Sourced by scripts/e2b-suite.sh when E2B_SUITE_NETNS=1, inside a fresh
# `unshare --net --mount` (root only): E2B's network tests curl https://1.1.1.1,
# https://8.8.8.8 and https://connectivitycheck.gstatic.com, and no test of
# ours may send traffic off this machine.  So here those are local:
#
# * the namespace has only `lo`, carrying 1.1.1.1, 8.8.8.8 and 142.250.80.1
#   besides 127.0.0.1, and NO route out (checked: no default route, no other
#   link);
# * a small HTTPS server on those addresses answers as the real hosts do for
#   the tests (1.1.1.1: 301, 8.8.8.8: 302, /generate_204: 204), with a
#   certificate of a throwaway test CA made here;
# * /etc/hosts and the system CA bundle are bind-mounted, in this mount
#   namespace only, with the name and the test CA added, so the sandbox's curl
#   trusts the server (the sandbox reads /etc/ssl/certs) and the egress proxy
#   resolves the name;
# * the `base` template becomes a policy that allows exactly those hosts and
#   the `curl` tool on top of the built-in base's ($work/netns/base.toml).
#
# Expects $work and $py; sets $netns_pid (the HTTPS server) for cleanup.

netns_dir="$work/netns"
mkdir -m 0755 "$netns_dir"
# On lo: a dummy link would do as well, but needs a kernel module that a
# container may lack.
ip link set lo up
for addr in 1.1.1.1 8.8.8.8 142.250.80.1; do
  ip addr add "$addr/32" dev lo
done
if [[ -n $(ip -4 route show default) || -n $(ip -6 route show default) ]]; then
  echo "e2b-suite netns: a default route exists; refusing to run" >&2
  exit 1
fi
links=$(ip -o link show | awk -F': ' '{print $2}' | sort | tr '\n' ' ')
if [[ $links != "lo " ]]; then
  echo "e2b-suite netns: unexpected links: $links" >&2
  exit 1
fi

(
  cd "$netns_dir"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=glassroom e2b-suite test CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout ca.key -out ca.pem 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=e2b-suite" -keyout server.key \
    -out server.csr 2>/dev/null
  printf '%s\n' "subjectAltName=IP:1.1.1.1,IP:8.8.8.8,DNS:connectivitycheck.gstatic.com" \
    "basicConstraints=CA:FALSE" "extendedKeyUsage=serverAuth" >server.ext
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
    -extfile server.ext -out server.pem 2>/dev/null
  rm -f ca.key server.csr
  cat /etc/ssl/certs/ca-certificates.crt ca.pem >bundle.crt
  { cat /etc/hosts; echo "142.250.80.1 connectivitycheck.gstatic.com"; } >hosts
  chmod 0644 bundle.crt hosts ca.pem
)
mount --bind "$netns_dir/bundle.crt" /etc/ssl/certs/ca-certificates.crt
mount --bind "$netns_dir/hosts" /etc/hosts

"$py" - "$netns_dir" >"$netns_dir/https.log" 2>&1 <<'EOF' &
import http.server, ssl, sys, threading

d = sys.argv[1]
# What each host answers the tests' requests with (status, Location).
ANSWERS = {"1.1.1.1": (301, "https://one.one.one.one/"), "8.8.8.8": (302, "https://dns.google/")}


class H(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        host = (self.headers.get("Host") or "").split(":")[0]
        if host == "connectivitycheck.gstatic.com" and self.path == "/generate_204":
            status, location = 204, None
        else:
            status, location = ANSWERS.get(host, (404, None))
        self.send_response(status)
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer


ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(f"{d}/server.pem", f"{d}/server.key")
servers = []
for addr in ("1.1.1.1", "8.8.8.8", "142.250.80.1"):
    s = http.server.ThreadingHTTPServer((addr, 443), H)
    s.socket = ctx.wrap_socket(s.socket, server_side=True)
    servers.append(s)
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("listening", flush=True)
servers[0].serve_forever()
EOF
netns_pid=$!
trap 'kill "$netns_pid" 2>/dev/null || true' EXIT  # e2b-suite.sh's cleanup replaces it
for _ in $(seq 1 50); do
  grep -q listening "$netns_dir/https.log" 2>/dev/null && break
  kill -0 "$netns_pid" 2>/dev/null || { cat "$netns_dir/https.log" >&2; exit 1; }
  sleep 0.2
done

# The base template of this run: the built-in base's tools (git where the
# host has it), curl, and these hosts.
"$py" - "$netns_dir/base.toml" "${E2B_SUITE_RISK:-low}" <<'EOF'
import json, sys

from glassroom.interfaces.http._config import builtin_templates

allow = ["1.1.1.1", "8.8.8.8", "connectivitycheck.gstatic.com", "142.250.80.1"]
with open(sys.argv[1], "w") as f:
    f.write(f'risk = "{sys.argv[2]}"\n[tools]\nallow = {json.dumps([*builtin_templates()["base"].tools.allow, "curl"])}\n')
    f.write(f"[network]\nallow = {json.dumps(allow)}\n[resources]\nmax_runtime_s = 3600\n")
EOF
