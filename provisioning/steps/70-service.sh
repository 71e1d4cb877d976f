#!/usr/bin/env bash
# The runtime as a systemd service with a restart policy and this node's rendezvous settings.
# Hosts without systemd (containers, test namespaces) run it as a managed process instead.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
unit=/etc/systemd/system/herd.service
args=${HERD_SERVE_ARGS:?HERD_SERVE_ARGS must hold herd serve arguments}
content="[Unit]
Description=herd inference runtime
After=network-online.target nvidia-persistenced.service
Wants=network-online.target

[Service]
EnvironmentFile=-$HERD_HOME/nccl.env
ExecStart=$HERD_HOME/venv/bin/herd serve $args
Restart=on-failure
RestartSec=5
TimeoutStopSec=60
KillMode=control-group
LimitMEMLOCK=infinity
LimitNOFILE=1048576

[Install]
WantedBy=multi-user.target"
if [ "$(ps -p 1 -o comm= 2>/dev/null)" != systemd ]; then
  printf '%s\n' "$content" > "$HERD_HOME/herd.service"
  skip "no systemd on this host: started as a managed process (unit kept in $HERD_HOME/herd.service)"
fi
if [ -f "$unit" ] && [ "$(cat "$unit")" = "$content" ]; then ok "unit up to date"; fi
if [ "$DRY_RUN" = 1 ]; then say "would write $unit"; printf '%s\n' "$content"; exit 0; fi
printf '%s\n' "$content" | as_root tee "$unit" >/dev/null
as_root systemctl daemon-reload
as_root systemctl enable herd.service
ok "unit installed"
