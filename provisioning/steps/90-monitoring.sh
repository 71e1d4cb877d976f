#!/usr/bin/env bash
# Optional: Prometheus on the head node, scraping herd's /metrics (herd's series, the engine's vllm:
# series and the GPUs'), with herd's alert rules; the Grafana dashboard beside it, and installed for
# a local Grafana if the host has one. Off unless HERD_MONITORING=1: a deployment that does not ask
# for monitoring gets no Prometheus.
# The files are `herd monitoring ENV --on-head` output: taken from HERD_MONITORING_DIR when given
# (files generated and checked elsewhere), otherwise generated here from the environment file that
# `herd serve` runs with. promtool checks them before anything is replaced.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
[ "${HERD_MONITORING:-0}" = 1 ] || skip "monitoring not requested (HERD_MONITORING=1 installs Prometheus on the head)"
case " ${HERD_SERVE_ARGS:-} " in
  *" --role worker "*) skip "a worker node: Prometheus runs on the head" ;;
esac

conf=${HERD_PROMETHEUS_DIR:-/etc/prometheus}
src=${HERD_MONITORING_DIR:-}
if [ -z "$src" ]; then
  src=$HERD_HOME/monitoring
  # herd serve's first argument is the environment file (HERD_SERVE_ARGS is shell-quoted by herd).
  eval "set -- ${HERD_SERVE_ARGS:-}"
  env_file=${HERD_ENV_FILE:-${1:-$HERD_HOME/environment.yaml}}
  [ -f "$env_file" ] || [ "$DRY_RUN" = 1 ] || fail "no environment file at $env_file (set HERD_ENV_FILE)"
  run "$HERD_HOME/venv/bin/herd" monitoring "$env_file" --out "$src" --on-head
fi

# Debian and Ubuntu package Prometheus with promtool (Debian 12: 2.42).
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
fi
key=""
if [ -f "$src/herd-api-key" ]; then key=$src/herd-api-key
elif [ -f "$HERD_HOME/secrets/api-key" ]; then key=$HERD_HOME/secrets/api-key
fi
if [ "$DRY_RUN" = 1 ]; then
  say "would check $src/prometheus.yml and its rules with promtool, then install them into $conf"
else
  [ -f "$src/prometheus.yml" ] || fail "no $src/prometheus.yml (write it with: herd monitoring ENV --out $src)"
  # Checked as they will be installed (the API key beside the config) before anything is replaced:
  # a refused configuration leaves the running one alone.
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' EXIT
  for name in prometheus.yml herd-rules.yml herd-targets.json; do
    if [ -f "$src/$name" ]; then cp "$src/$name" "$stage/$name"; fi
  done
  if grep -q 'credentials_file: herd-api-key' "$src/prometheus.yml"; then
    # The scrape job reads the deployment's API key from herd-api-key beside prometheus.yml.
    [ -n "$key" ] || fail "the deployment has an API key but neither $src/herd-api-key nor $HERD_HOME/secrets/api-key exists"
    install -m 0600 "$key" "$stage/herd-api-key"
  fi
  out=$(promtool check config "$stage/prometheus.yml" 2>&1) || fail "promtool refuses the configuration: $out"
fi

as_root install -d -m 0755 "$conf"
if [ -f "$conf/prometheus.yml" ] && [ ! -f "$conf/prometheus.yml.before-herd" ] \
   && ! grep -q "herd monitoring" "$conf/prometheus.yml"; then
  as_root cp -p "$conf/prometheus.yml" "$conf/prometheus.yml.before-herd"   # the package's own, kept once
fi
owner=root
id -u prometheus >/dev/null 2>&1 && owner=prometheus
for name in herd-rules.yml grafana-dashboard.json herd-targets.json; do
  [ -f "$src/$name" ] || [ "$DRY_RUN" = 1 ] || continue
  as_root install -m 0644 "$src/$name" "$conf/$name"
done
# Readable by Prometheus alone.
[ -z "$key" ] || as_root install -m 0600 -o "$owner" "$key" "$conf/herd-api-key"
as_root install -m 0644 "$src/prometheus.yml" "$conf/prometheus.yml"

# A local Grafana (not packaged by Debian; installed by the operator) loads the dashboard from disk.
if [ -d /etc/grafana/provisioning/dashboards ]; then
  as_root install -d -m 0755 /var/lib/grafana/dashboards/herd
  as_root install -m 0644 "$src/grafana-dashboard.json" /var/lib/grafana/dashboards/herd/herd.json
  printf '%s\n' "apiVersion: 1" "providers:" "  - name: herd" "    type: file" \
    "    options: {path: /var/lib/grafana/dashboards/herd}" \
    | { if [ "$DRY_RUN" = 1 ]; then cat >/dev/null; else as_root tee /etc/grafana/provisioning/dashboards/herd.yaml >/dev/null; fi; }
fi

systemd=${HERD_SYSTEMD:-$([ "$(ps -p 1 -o comm= 2>/dev/null)" = systemd ] && echo 1 || echo 0)}
if [ "$systemd" != 1 ]; then
  skip "no systemd on this host: configuration installed in $conf; start it with prometheus --config.file=$conf/prometheus.yml"
fi
as_root systemctl enable prometheus
as_root systemctl restart prometheus
if [ "$DRY_RUN" != 1 ]; then
  command -v curl >/dev/null || ok "Prometheus restarted (no curl here to wait for it)"
  for _ in $(seq 1 30); do
    curl -fsS -o /dev/null http://127.0.0.1:9090/-/ready 2>/dev/null && ok "Prometheus ready on :9090 with herd's scrape config and rules"
    sleep 1
  done
  fail "Prometheus did not become ready on :9090 (journalctl -u prometheus)"
fi
ok "Prometheus would be configured"
