#!/usr/bin/env bash
# HAProxy in front of the replicas, on the one host onprem.load_balancer names (every other host skips
# this step: only the balancer's steps carry a configuration). Debian's package; the configuration is
# rendered (and every value checked) by provisioning/haproxy.py: HERD_HAPROXY_CONFIG. The certificate
# and key (one PEM bundle) arrive as a 0600 file the installer uploaded: HERD_HAPROXY_PEM_SOURCE.
# A new configuration is validated (haproxy -c) before it replaces the running one, then loaded
# without dropping connections (systemctl reload; without systemd, haproxy -sf: the old process
# finishes its requests while the new one accepts).
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
config=${HERD_HAPROXY_CONFIG:-}
[ -n "$config" ] || skip "not the load balancer"
cfg=${HERD_HAPROXY_CONFIG_PATH:-/etc/haproxy/haproxy.cfg}
pem=${HERD_HAPROXY_PEM:?HERD_HAPROXY_PEM must name where the configuration reads the PEM bundle}
pem_source=${HERD_HAPROXY_PEM_SOURCE:?HERD_HAPROXY_PEM_SOURCE must name the uploaded PEM bundle}
sock=${HERD_HAPROXY_SOCKET:?HERD_HAPROXY_SOCKET must name the admin socket}
pidfile=${HERD_HAPROXY_PID:-/run/haproxy/herd.pid}
systemd=${HERD_SYSTEMD:-$([ "$(ps -p 1 -o comm= 2>/dev/null)" = systemd ] && echo 1 || echo 0)}

# The package: Debian's haproxy (2.2 or later: http-check send, http-error).
if ! command -v haproxy >/dev/null; then
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends haproxy
fi
if [ "$DRY_RUN" != 1 ]; then
  version=$(haproxy -v | awk 'NR==1 {print $3}')
  major=${version%%.*}; rest=${version#*.}; minor=${rest%%.*}
  { [ "$major" -gt 2 ] || { [ "$major" -eq 2 ] && [ "$minor" -ge 2 ]; }; } ||
    fail "haproxy $version is too old (herd's configuration needs 2.2 or later)"
fi

# The certificate: root's alone (HAProxy reads it before dropping its privileges).
[ "$DRY_RUN" = 1 ] || [ -s "$pem_source" ] || fail "$pem_source: no PEM bundle (the installer uploads it)"
if [ "$DRY_RUN" != 1 ]; then
  if ! grep -q "PRIVATE KEY-----" "$pem_source" || ! grep -q "BEGIN CERTIFICATE-----" "$pem_source"; then
    fail "$pem_source: a PEM bundle holds the certificate chain and its private key"
  fi
fi
# What HAProxy holds in memory besides its configuration: a new certificate or CA needs a reload too.
certs() { { cat "$pem" "${HERD_HAPROXY_BACKEND_CA:-/dev/null}" 2>/dev/null || true; } | sha256sum; }
certs_before=$(certs)
as_root install -d -m 0700 "$(dirname "$pem")"
as_root install -m 0600 "$pem_source" "$pem"
# The CA the replicas' certificates are checked against (replicas serving TLS), where uploaded.
if [ -n "${HERD_HAPROXY_BACKEND_CA:-}" ]; then
  [ "$DRY_RUN" = 1 ] || grep -q "BEGIN CERTIFICATE-----" "${HERD_HAPROXY_BACKEND_CA_SOURCE:?}" ||
    fail "${HERD_HAPROXY_BACKEND_CA_SOURCE}: no CA certificate for the replicas (the installer uploads it)"
  as_root install -d -m 0700 "$(dirname "$HERD_HAPROXY_BACKEND_CA")"
  as_root install -m 0644 "$HERD_HAPROXY_BACKEND_CA_SOURCE" "$HERD_HAPROXY_BACKEND_CA"
fi
as_root install -d -m 0755 "$(dirname "$sock")" "$(dirname "$pidfile")" "$(dirname "$cfg")"
if grep -q '^[[:space:]]*chroot /var/lib/haproxy' <<<"$config"; then as_root install -d -m 0755 /var/lib/haproxy; fi

# The configuration, validated before it replaces anything.
candidate=$(mktemp)
trap 'rm -f "$candidate"' EXIT
printf '%s' "$config" > "$candidate"
if [ "$DRY_RUN" = 1 ]; then
  say "would validate and install $cfg:"; cat "$candidate"
else
  check=$(haproxy -c -f "$candidate" 2>&1) || fail "the rendered configuration is invalid: $(grep -m3 ALERT <<<"$check")"
fi
running() { [ -f "$pidfile" ] && kill -0 "$(head -n1 "$pidfile")" 2>/dev/null; }
if [ -f "$cfg" ] && cmp -s "$candidate" "$cfg" && [ "$(certs)" = "$certs_before" ] &&
   { [ "$systemd" = 1 ] && systemctl is-active -q haproxy || running; }; then
  ok "configuration up to date; haproxy running"
fi
# Debian's own configuration is kept once, beside ours.
if [ -f "$cfg" ] && ! grep -q '^# herd load balancer' "$cfg" && [ ! -f "$cfg.dpkg-herd-orig" ]; then
  as_root cp -p "$cfg" "$cfg.dpkg-herd-orig"
fi
as_root install -m 0644 "$candidate" "$cfg"

# Load it: a reload keeps established connections (requests in flight finish on the old process).
if [ "$systemd" = 1 ]; then
  as_root systemctl enable haproxy
  as_root systemctl reload-or-restart haproxy
elif running; then
  as_root haproxy -D -f "$cfg" -p "$pidfile" -sf "$(head -n1 "$pidfile")"
else
  as_root haproxy -D -f "$cfg" -p "$pidfile"
fi
[ "$DRY_RUN" = 1 ] && exit 0

# Verify: the admin socket answers and lists every replica.
for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || fail "haproxy started but its admin socket $sock did not appear"
ok "haproxy $version listening on ${HERD_HAPROXY_LISTEN:-its frontend}; admin socket $sock"
