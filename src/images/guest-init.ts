/**
 * The init of the minimal guest image, a busybox sh script. The same script is /init in the
 * initramfs and in the root filesystem; /etc/typevisor/rootfs marks the latter. It understands:
 * - `root=/dev/NAME`: (initramfs only) wait up to 10 s for the block device, mount it as ext4 and
 *   switch_root into it, whose init then continues below;
 * - `typevisor.run=<base64 of a sh script>`: run it, print `typevisor-guest: exit <code>`, power off;
 * - otherwise busybox init with a respawning shell on the console.
 * The kernel passes `name.param=` words to no process, but they stay in /proc/cmdline
 * (Documentation/admin-guide/kernel-parameters.rst), so we read that.
 * The line `typevisor-guest: userspace up` is printed once, first thing, for boot-time benchmarks.
 */
import { TypevisorError } from "../errors.js";

export const USERSPACE_UP_LINE = "typevisor-guest: userspace up";
export const ROOTFS_UP_LINE = "typevisor-guest: rootfs up";
export const EXIT_LINE_PREFIX = "typevisor-guest: exit ";
/** x86 COMMAND_LINE_SIZE is 2048 bytes (arch/x86/include/asm/setup.h); leave room for the rest. */
export const MAX_RUN_SCRIPT_CMDLINE = 1536;

export const GUEST_INIT = `#!/bin/sh
# typevisor minimal guest init (generated from src/images/guest-init.ts)
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q " /dev " /proc/mounts || mount -t devtmpfs devtmpfs /dev
if [ -e /etc/typevisor/rootfs ]; then echo "${ROOTFS_UP_LINE}"; else echo "${USERSPACE_UP_LINE}"; fi
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
if [ -f /etc/typevisor/modules ]; then
  rel=$(uname -r)
  while read -r m; do
    [ -n "$m" ] && { insmod "/lib/modules/$rel/$m" 2>/dev/null || echo "typevisor-guest: insmod $m failed"; }
  done < /etc/typevisor/modules
fi
root=""
run=""
set -f
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    root=*) root="\${arg#root=}" ;;
    typevisor.run=*) run="\${arg#typevisor.run=}" ;;
  esac
done
set +f
if [ -n "$root" ] && [ ! -e /etc/typevisor/rootfs ]; then
  i=0
  while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  if [ ! -b "$root" ]; then
    echo "typevisor-guest: root device $root did not appear within 10 s; staying in the initramfs"
  elif mkdir -p /newroot && mount -t ext4 "$root" /newroot; then
    umount /tmp /run /dev/pts
    mount --move /dev /newroot/dev
    umount /proc /sys
    exec switch_root /newroot /init
  else
    echo "typevisor-guest: cannot mount $root; staying in the initramfs"
  fi
fi
if [ -n "$run" ]; then
  if echo "$run" | base64 -d > /run/typevisor-run.sh 2>/dev/null; then
    sh /run/typevisor-run.sh
    code=$?
  else
    echo "typevisor-guest: typevisor.run is not valid base64"
    code=2
  fi
  echo "${EXIT_LINE_PREFIX}$code"
  sync
  poweroff -f
fi
exec /bin/busybox init
`;

/** busybox init's table: a login shell on the console (cttyhack gives it a controlling tty). */
export const GUEST_INITTAB = `::sysinit:/bin/hostname typevisor
::respawn:/bin/cttyhack /bin/sh -l
::ctrlaltdel:/bin/reboot
::shutdown:/bin/sync
`;

export const GUEST_PROFILE = `export PS1='typevisor:\\w\\$ '
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root
`;

/** The kernel command-line word that makes the guest run `script` and power off. */
export function runScriptArg(script: string): string {
  const arg = `typevisor.run=${Buffer.from(script, "utf8").toString("base64")}`;
  if (arg.length > MAX_RUN_SCRIPT_CMDLINE) {
    throw new TypevisorError("RUN_SCRIPT_TOO_LONG", `the guest script is too long for the kernel command line (${arg.length} > ${MAX_RUN_SCRIPT_CMDLINE} bytes encoded)`);
  }
  return arg;
}

/** Exit code from a guest's console output (`typevisor-guest: exit N`), or undefined. */
export function parseGuestExit(console: string): number | undefined {
  const m = /typevisor-guest: exit (\d+)\r?$/m.exec(console);
  return m?.[1] === undefined ? undefined : Number(m[1]);
}
