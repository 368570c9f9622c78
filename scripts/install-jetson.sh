#!/usr/bin/env bash
# Installs edge-agent as a system service on a Jetson (JetPack 6, Ubuntu 22.04, Python 3.10).
# Idempotent: run it again to upgrade the code; it never overwrites an existing agent.toml.
#
#   sudo scripts/install-jetson.sh [--channel walk] [--mqtt mqtts://broker:8883] [--no-start]
#
# Env: PREFIX (/opt/edge-agent), EXTRAS (cpu,jetson,systemd), ROOT (install under another root, for
# tests: no apt, no users, no systemctl).
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${ROOT:-}
PREFIX=${PREFIX:-/opt/edge-agent}
# cpu: ONNX Runtime, what serves when TensorRT, pycuda or the GPU is unusable (and jetson-check's reference).
EXTRAS=${EXTRAS:-cpu,jetson,systemd}
CHANNEL=walk
MQTT_URL=mqtt://127.0.0.1:1883
START=1
while [ $# -gt 0 ]; do
  case "$1" in
    --channel) CHANNEL=$2; shift 2 ;;
    --mqtt) MQTT_URL=$2; shift 2 ;;
    --no-start) START=0; shift ;;
    *) echo "install-jetson: unknown option $1" >&2; exit 2 ;;
  esac
done
[ -n "$ROOT" ] || [ "$(id -u)" -eq 0 ] || { echo "install-jetson: run as root (sudo)" >&2; exit 1; }
say() { echo "install-jetson: $*"; }
live() { [ -z "$ROOT" ]; }  # false under ROOT=: skip what needs the real system

# 1. Debian packages: venv, and what systemd-python and pycuda build from (no aarch64 wheels).
#    TensorRT's Python bindings come with JetPack (python3-libnvinfer); the venv sees them through
#    --system-site-packages.
if live; then
  need=()
  for pkg in python3-venv python3-dev build-essential libsystemd-dev pkg-config; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    say "apt-get install ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  fi
  dpkg -s python3-libnvinfer >/dev/null 2>&1 || say "WARNING: python3-libnvinfer is missing (JetPack's TensorRT bindings); the agent will fall back to ONNX Runtime"
fi

# 2. The service user (no login, no home of its own) and the admin group.
if live; then
  getent group edge-agent-admin >/dev/null || groupadd --system edge-agent-admin
  if ! id edge-agent >/dev/null 2>&1; then
    useradd --system --user-group --home-dir /var/lib/edge-agent --no-create-home \
      --shell /usr/sbin/nologin --groups video,render edge-agent
    say "created user edge-agent"
  fi
fi
own() { if live; then chown "$@"; fi; }

# 3. Directories (systemd also creates them from the unit; the inbox needs its own group).
install -d -m 0755 "$ROOT$PREFIX"
install -d -m 0750 "$ROOT/etc/edge-agent"
install -d -m 0751 "$ROOT/var/lib/edge-agent"
install -d -m 2770 "$ROOT/var/lib/edge-agent/inbox"
own root:edge-agent "$ROOT/etc/edge-agent"
own edge-agent:edge-agent "$ROOT/var/lib/edge-agent"
own edge-agent:edge-agent-admin "$ROOT/var/lib/edge-agent/inbox"

# 4. The venv, with the system site-packages for tensorrt; the project installed (not editable).
VENV="$ROOT$PREFIX/venv"
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  python3 -m venv --system-site-packages "$VENV"
fi
# pycuda finds CUDA through nvcc on PATH or CUDA_ROOT; sudo's secure_path drops /usr/local/cuda/bin.
CUDA_ROOT=${CUDA_ROOT:-/usr/local/cuda}
export CUDA_ROOT PATH="$CUDA_ROOT/bin:$PATH"
if live && [[ ",$EXTRAS," == *",jetson,"* ]] && ! command -v nvcc >/dev/null; then
  say "WARNING: no nvcc in $CUDA_ROOT/bin: pycuda cannot build (install JetPack's cuda-toolkit, or set CUDA_ROOT)"
fi
if live || [ -n "${INSTALL_PIP:-}" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade "$SRC[$EXTRAS]"
  "$VENV/bin/python" -c 'import tensorrt; print("install-jetson: TensorRT", tensorrt.__version__)' 2>/dev/null \
    || say "WARNING: tensorrt does not import in the venv"
fi

# The documentation the units point at (Documentation=), beside the venv.
install -d -m 0755 "$ROOT$PREFIX/docs"
install -m 0644 "$SRC/README.md" "$ROOT$PREFIX/README.md"
install -m 0644 "$SRC"/docs/*.md "$ROOT$PREFIX/docs/"

# 5. The config template, only when there is none (the file is the operator's from then on).
CONF="$ROOT/etc/edge-agent/agent.toml"
if [ ! -e "$CONF" ]; then
  sed -e "s|@CHANNEL@|$CHANNEL|" -e "s|@MQTT_URL@|$MQTT_URL|" "$SRC/systemd/agent.toml.example" > "$CONF.new"
  chmod 0640 "$CONF.new"
  own root:edge-agent "$CONF.new"
  mv "$CONF.new" "$CONF"
  say "wrote $CONF (channel $CHANNEL, broker $MQTT_URL)"
else
  say "keeping $CONF"
fi

# 6. The unit: install, enable, start (or restart to pick up new code).
UNIT_DIR="$ROOT/etc/systemd/system"
install -d -m 0755 "$UNIT_DIR"
sed "s|/opt/edge-agent/venv/bin/agent|$PREFIX/venv/bin/agent|" "$SRC/systemd/edge-agent.service" > "$UNIT_DIR/edge-agent.service.new"
chmod 0644 "$UNIT_DIR/edge-agent.service.new"
mv "$UNIT_DIR/edge-agent.service.new" "$UNIT_DIR/edge-agent.service"
if live; then
  systemctl daemon-reload
  systemctl enable edge-agent.service >/dev/null
  if [ "$START" -eq 1 ]; then
    systemctl restart edge-agent.service
    say "started: systemctl status edge-agent; journalctl -u edge-agent -f"
  fi
fi
say "done. Add operators to the groups: usermod -aG edge-agent,edge-agent-admin <user>"
