#!/usr/bin/env bash
# A node's file systems (cluster.yaml's setup_commands): the shared file system at VARCON_SHARED_DIR, holding the
# FFCV data cache and the Ray storage of every bundled config (an EFS file system over NFS 4.1, from
# ~/.varcon/cluster.env; nothing when VARCON_SHARED_FS is empty), and the instance-store NVMe at /mnt/local
# (scripts/mount_local_nvme.sh: nothing on nodes without one). Idempotent.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/node_env.sh"
source "$(dirname "${BASH_SOURCE[0]}")/setup_lib.sh"
log() { printf '[node-mounts] %s\n' "$*"; }
if [ -z "$VARCON_SHARED_FS" ]; then
  log "no shared file system in $CLUSTER_ENV (VARCON_SHARED_FS): nothing mounted"
elif mountpoint -q "$VARCON_SHARED_DIR"; then
  log "$VARCON_SHARED_DIR is mounted"
else
  [ -z "$(missing_packages nfs-common)" ] || apt_install nfs-common > /dev/null
  as_root mkdir -p "$VARCON_SHARED_DIR"
  as_root mount -t nfs4 -o nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport \
    "$VARCON_SHARED_FS" "$VARCON_SHARED_DIR"
  as_root chown "$(id -un)" "$VARCON_SHARED_DIR"
  log "$VARCON_SHARED_FS at $VARCON_SHARED_DIR"
fi
bash "$(dirname "${BASH_SOURCE[0]}")/mount_local_nvme.sh" /mnt/local
