#!/usr/bin/env bash
# netns_hosts.sh up N | down | restart I : N test "hosts" on this machine, each a network namespace
# with its own hostname, /etc/hosts, copy-on-write /etc /opt /root /home (a user created on a host
# exists on that host only, as on separate machines), and a real OpenSSH sshd (key-only, root). Addresses 10.250.0.(10+i) on a private bridge; no default route, nothing leaves
# the machine. `restart I` brings host I's sshd back after everything in it was killed; its disks
# (the overlay upper dirs) persist, like a rebooted machine's.
# HERD_HOSTS_TAG (namespaces TAG-hI, bridge TAGbr0) and HERD_HOSTS_NET (the /24) let test files that
# may run at the same time on one machine keep separate sets of hosts: `down` removes only its own.
# The hosts share this machine's cores: each says it has its share of them (HERD_HOSTS_CPUS, default
# the cores / N, at least 1) in /sys/devices/system/cpu/online, which os.cpu_count() reads and herd
# sizes a rank's torch threads by. Three hosts on 2 cores that each ran a thread per core were 6
# threads spinning in lockstep on 2 cores: on a loaded machine a TP-3 group streamed 0.1-0.2 token/s
# and `herd up`'s smoke timed out (measured); with one core each, ~3 token/s.
set -euo pipefail
ACTION=${1:?up N | down | restart I}
N=${2:-3}
DIR=${HERD_HOSTS_DIR:-/tmp/herd-test-hosts}
TAG=${HERD_HOSTS_TAG:-herdt}
NS=$TAG-h BR=${TAG}br0 VETH=$TAG-v NET=${HERD_HOSTS_NET:-10.250.0}

down() {
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${NS}[0-9]+$" || true); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  # A deleted namespace is freed by the kernel later (seconds, on a busy machine); until then its veth
  # pair lingers here and blocks the next `up`. Deleting our end removes the pair now.
  for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^${VETH}[0-9]+$" || true); do
    ip link del "$link" 2>/dev/null || true
  done
  ip link show "$BR" >/dev/null 2>&1 && ip link del "$BR"
  rm -rf "$DIR"
}

start_sshd() {
  local i=$1
  local d="$DIR/h$i"
  ip netns exec "$NS$i" unshare --mount --uts --propagation private -- /bin/bash -ec "
    hostname h$i
    for p in etc opt root home; do
      mount -t overlay overlay -o lowerdir=/\$p,upperdir='$d'/fs/\$p.upper,workdir='$d'/fs/\$p.work /\$p
    done
    mount --bind '$DIR/etc_hosts' /etc/hosts
    mount --bind '$DIR/resolv.conf' /etc/resolv.conf
    mount --bind '$DIR/cpu_online' /sys/devices/system/cpu/online
    exec /usr/sbin/sshd -f '$d/sshd_config' -E '$d/sshd.log'"
  for _ in $(seq 1 100); do
    ip netns exec "$NS$i" ss -Hltn "sport = :22" | grep -q LISTEN && return 0
    sleep 0.05
  done
  echo "netns_hosts.sh: sshd of h$i did not come up" >&2
  return 1
}

case "$ACTION" in
  down) down; exit 0 ;;
  restart) start_sshd "$N"; exit 0 ;;
  up) ;;
  *) echo "netns_hosts.sh: unknown action $ACTION" >&2; exit 2 ;;
esac

[ "$(id -u)" = 0 ] || { echo "netns_hosts.sh: needs root" >&2; exit 1; }
for tool in ip sshd ssh-keygen unshare; do
  command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || { echo "netns_hosts.sh: $tool missing (apt-get install iproute2 openssh-server)" >&2; exit 1; }
done
down
if ip -4 route show | grep -q "^${NET}\.0/24"; then
  echo "netns_hosts.sh: ${NET}.0/24 is already routed here (other test hosts?); remove them first" >&2
  exit 1
fi
mkdir -p "$DIR" /run/sshd
chmod 700 "$DIR"
ssh-keygen -q -t ed25519 -N '' -C herd-test-client -f "$DIR/id_ed25519"
ip link add "$BR" type bridge
ip addr add "$NET.1/24" dev "$BR"
ip link set "$BR" up
{ echo "127.0.0.1 localhost"; for i in $(seq 1 "$N"); do echo "$NET.$((10 + i)) h$i"; done; } > "$DIR/etc_hosts"
echo "# no resolver" > "$DIR/resolv.conf"
CPUS=${HERD_HOSTS_CPUS:-$(( $(nproc) / N ))}
[ "$CPUS" -ge 1 ] || CPUS=1
if [ "$CPUS" = 1 ]; then echo 0; else echo "0-$((CPUS - 1))"; fi > "$DIR/cpu_online"
# The hosts' python: the system's when it is the same version as this machine's (herd's wheels are
# built for that) and can make a venv, since the runtime runs as the unprivileged `herd` user, who
# cannot reach an interpreter under /root; else this machine's.
PYBIN=$(dirname "$(python3 -c 'import os,sys; print(os.path.realpath(sys.executable))')")
if [ "$(/usr/bin/python3 -c 'import ensurepip, sys; print(sys.version_info[:2])' 2>/dev/null)" = \
     "$(python3 -c 'import sys; print(sys.version_info[:2])')" ]; then
  PYBIN=/usr/bin
fi
for i in $(seq 1 "$N"); do
  d="$DIR/h$i" ip4="$NET.$((10 + i))"
  mkdir -p "$d"/fs/{etc,opt,root,home}.{upper,work}
  ssh-keygen -q -t ed25519 -N '' -C "h$i" -f "$d/ssh_host_ed25519_key"
  cp "$DIR/id_ed25519.pub" "$d/authorized_keys"
  echo "export PATH=$PYBIN:\$PATH" > "$d/fs/root.upper/.bashrc"
  cat > "$d/sshd_config" <<CFG
ListenAddress $ip4:22
HostKey $d/ssh_host_ed25519_key
PidFile $d/sshd.pid
AuthorizedKeysFile $d/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
MaxStartups 100
MaxSessions 100
Subsystem sftp internal-sftp
CFG
  ip netns add "$NS$i"
  ip link add "$VETH$i" type veth peer name "${VETH}${i}p"
  ip link set "${VETH}${i}p" netns "$NS$i"
  ip link set "$VETH$i" master "$BR" up
  ip -n "$NS$i" link set "${VETH}${i}p" name eth0
  ip -n "$NS$i" addr add "$ip4/24" dev eth0
  ip -n "$NS$i" link set lo up
  ip -n "$NS$i" link set eth0 up
  start_sshd "$i"
done
echo "$DIR"
