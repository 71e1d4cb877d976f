#!/usr/bin/env bash
# The runtime as a systemd service, run by the unprivileged system user `herd` in a sandbox.
# The unit itself is rendered (and every value escaped) by provisioning/steps.py: HERD_SERVICE_UNIT.
# This step makes what the unit assumes: the user, its GPU device groups, the directories it may
# write, the API key (and the head's TLS key) readable by it alone; then installs and enables the unit.
# Hosts without systemd (containers, test namespaces) run the runtime as a managed process instead:
# there the unit is only kept for reference and the host's users are left alone.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
unit=/etc/systemd/system/herd.service
content=${HERD_SERVICE_UNIT:?HERD_SERVICE_UNIT must hold the rendered unit}
user=herd
# systemd as PID 1, unless the caller says (HERD_SYSTEMD=1|0: tests, images built offline).
systemd=${HERD_SYSTEMD:-$([ "$(ps -p 1 -o comm= 2>/dev/null)" = systemd ] && echo 1 || echo 0)}
if [ "$systemd" != 1 ] && [ "$DRY_RUN" != 1 ]; then
  mkdir -p "$HERD_HOME"
  printf '%s' "$content" > "$HERD_HOME/herd.service"
  skip "no systemd on this host: started as a managed process (unit kept in $HERD_HOME/herd.service)"
fi

# The user: a system account with no login shell and no password. Its home is under the state
# directory, the only place (with the serve state) the unit lets it write.
if ! id -u "$user" >/dev/null 2>&1; then
  # A group left behind by an earlier removal is reused (useradd --user-group would refuse it).
  if getent group "$user" >/dev/null; then group_flag=(--gid "$user"); else group_flag=(--user-group); fi
  as_root useradd --system "${group_flag[@]}" --no-create-home --no-log-init --home-dir "$HERD_HOME/state/home" \
    --shell /usr/sbin/nologin --comment "herd inference runtime" "$user"
fi
# GPU access: /dev/nvidia* are usually world-usable (0666), but a driver configured with
# NVreg_DeviceFileGID/Mode and /dev/dri/renderD* (group render) need the group. Only groups the
# host has; membership is added, never replaced.
for group in video render; do
  getent group "$group" >/dev/null || continue
  id -nG "$user" 2>/dev/null | tr ' ' '\n' | grep -qx "$group" || as_root usermod -aG "$group" "$user"
done
# What it writes (serve state: pid files, rank logs; $HOME: compile caches), owned by it. The
# venv, the weights, the stamps under state/steps and the unit stay root's.
as_root install -d -m 0755 "$HERD_HOME/state"
as_root install -d -o "$user" -g "$user" -m 0750 "$HERD_HOME/state/serve" "$HERD_HOME/state/home"
if [ -d "$HERD_HOME/state/serve" ] && [ -n "$(find "$HERD_HOME/state/serve" "$HERD_HOME/state/home" \
     ! -user "$user" -print -quit 2>/dev/null)" ]; then
  # A runtime that ran as root before (the managed process) left files the service could not rewrite.
  as_root chown -R "$user:$user" "$HERD_HOME/state/serve" "$HERD_HOME/state/home"
fi
# Secrets: the directory and the API key are the service's alone (0700/0600). A secret it does
# not use (the hub token, read by the root-run weights step) keeps its root owner and 0600.
if [ -d "$HERD_HOME/secrets" ]; then
  as_root chown "$user:$user" "$HERD_HOME/secrets"
  as_root chmod 0700 "$HERD_HOME/secrets"
  # The API key and the head's TLS certificate and key: the service reads them.
  for secret in api-key tls-cert tls-key; do
    [ -f "$HERD_HOME/secrets/$secret" ] || continue
    as_root chown "$user:$user" "$HERD_HOME/secrets/$secret"
    as_root chmod 0600 "$HERD_HOME/secrets/$secret"
  done
fi

if [ -f "$unit" ] && [ "$(cat "$unit")" = "${content%$'\n'}" ]; then ok "user $user ready; unit up to date"; fi
if [ "$DRY_RUN" = 1 ]; then say "would write $unit"; printf '%s' "$content"; exit 0; fi
printf '%s' "$content" | as_root tee "$unit" >/dev/null
as_root systemctl daemon-reload
as_root systemctl enable herd.service
ok "user $user ready; unit installed"
