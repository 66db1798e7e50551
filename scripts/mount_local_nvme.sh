#!/usr/bin/env bash
# The node's instance-store NVMe disks (p4d.24xlarge: 8 x 1 TB) as one RAID-0 ext4 volume at /mnt/local, with
# /mnt/local/varcon-stage for data.stage (pipeline/data/staging.py). cluster.yaml's setup runs it on every node:
# idempotent, and nothing happens on a node without instance storage (data.stage=auto then reads /mnt/shared).
# Instance storage is emptied when an instance stops: staged copies are made again, from their manifests.
set -euo pipefail
MOUNT=${1:-/mnt/local}
log() { printf '[local-nvme] %s\n' "$*"; }
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! mountpoint -q "$MOUNT"; then
  mapfile -t disks < <(for link in /dev/disk/by-id/nvme-Amazon_EC2_NVMe_Instance_Storage_*; do
                         [ -e "$link" ] && [[ "$link" != *-part* ]] && readlink -f "$link"; done | sort -u)
  if ((${#disks[@]} == 0)); then
    log "no instance-store NVMe disk on this node: nothing to mount"
    exit 0
  fi
  device=${disks[0]}
  if ((${#disks[@]} > 1)); then
    command -v mdadm > /dev/null || $SUDO apt-get install -y -q mdadm > /dev/null
    [ -e /dev/md0 ] || $SUDO mdadm --create /dev/md0 --run --level=0 --raid-devices=${#disks[@]} "${disks[@]}"
    device=/dev/md0
  fi
  $SUDO blkid "$device" > /dev/null || $SUDO mkfs.ext4 -q -F -E nodiscard "$device"
  $SUDO mkdir -p "$MOUNT"
  $SUDO mount -o noatime "$device" "$MOUNT"
  log "${#disks[@]} instance-store disk(s) as $device at $MOUNT"
fi
$SUDO mkdir -p "$MOUNT/varcon-stage"
$SUDO chown "$(id -un)" "$MOUNT/varcon-stage"
