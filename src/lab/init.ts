/**
 * /init of the lab initramfs (busybox sh), following docs/lab.md: load virtio/9p/overlay/kvm
 * modules, mount the host root read-only over 9p with a tmpfs overlay on top (cgroup2 on its
 * /sys/fs/cgroup), chroot into it, check that /dev/kvm is real KVM (kvm_amd, svm), run the spec,
 * report its exit code with a marker (see console.ts) and power off. Parameters come on the kernel
 * command line as tvlab.* words.
 *
 * Three serial ports: ttyS0 carries the command (its output, markers, an interactive terminal);
 * ttyS1 is the kernel's console (its messages go to a log file on the host, apart from the
 * command's output); the third, on its own IRQ, is the agent's: a shell loop that answers "dump"
 * with the lab's timers, interrupts and threads (agent.ts), for the host's silence watchdog.
 */

/** Modules the lab loads, dependencies resolved from the modules themselves; `?` = only if present. */
export const LAB_MODULES = [
  "virtio_ring",
  "virtio",
  "virtio_pci_legacy_dev",
  "virtio_pci_modern_dev",
  "virtio_pci",
  "netfs",
  "fscache",
  "9pnet",
  "9pnet_virtio",
  "9p",
  "overlay",
  "irqbypass",
  "kvm",
  "ccp?",
  "kvm_amd",
  // TAP networks for nested guests: tun (TUN/TAP), bridge (+stp, llc), veth, vhost-net, macvtap
  "tun?",
  "bridge?",
  "veth?",
  "vhost_net?",
  "macvtap?",
];

export const LAB_INIT = `#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# the kernel console is ttyS1 (the host's kernel log); the command and the markers use ttyS0
exec </dev/null >/dev/ttyS0 2>&1
nonce=x spec="" agent="" tty=none stdin=null
set -f
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    tvlab.nonce=*) nonce="\${arg#tvlab.nonce=}" ;;
    tvlab.spec=*) spec="\${arg#tvlab.spec=}" ;;
    tvlab.agent=*) agent="\${arg#tvlab.agent=}" ;;
    tvlab.tty=*) tty="\${arg#tvlab.tty=}" ;;
    tvlab.stdin=*) stdin="\${arg#tvlab.stdin=}" ;;
  esac
done
set +f
fail() {
  echo "@@TVLAB:$nonce:error:$*@@"
  poweroff -f
  exit 1
}
rel=$(uname -r)
while read -r m; do
  [ -n "$m" ] && { insmod "/lib/modules/$rel/$m" 2>/dev/null || echo "typevisor-lab: insmod $m failed"; }
done < /etc/typevisor/modules
mkdir -p /lower /ovl /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot /lower || fail "cannot mount the host root over 9p"
mount -t tmpfs -o mode=0755 tmpfs /ovl
mkdir -p /ovl/upper /ovl/work
mount -t overlay -o lowerdir=/lower,upperdir=/ovl/upper,workdir=/ovl/work overlay /newroot || fail "cannot mount the overlay on the host root"
specpath=$(echo "$spec" | base64 -d)
cp "/newroot$specpath" /spec.sh || fail "cannot read the run spec $specpath through 9p"
for d in proc sys dev tmp run; do mkdir -p "/newroot/$d"; done
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
# cgroup v2 for the control plane's per-VM limits (Documentation/admin-guide/cgroup-v2.rst): nothing
# mounts a v1 hierarchy in here, so every controller (cpu, memory, ...) is free for the v2 tree
mount -t cgroup2 none /newroot/sys/fs/cgroup || echo "typevisor-lab: cannot mount cgroup2"
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o mode=0620,ptmxmode=0666 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
# /tmp is NOT replaced: the host's /tmp shows through the overlay (a checkout cloned under /tmp, as a CI
# runner may do, must be visible), and writes land in the overlay's tmpfs like everywhere else.
mount -t tmpfs -o mode=0755 tmpfs /newroot/run
cp /spec.sh /newroot/run/typevisor-lab.sh
if [ -n "$agent" ] && cp "/newroot$(echo "$agent" | base64 -d)" /agent.sh; then
  # answers "dump" on its own port; it runs outside the chroot, beside the command, until poweroff
  (
    exec 3<>/dev/ttyS2 || exit 0
    stty raw -echo <&3
    while read -r req <&3; do
      [ "$req" = dump ] || continue
      sh /agent.sh >&3 2>&1
      echo "@@TVLAB:$nonce:agent-end@@" >&3
    done
  ) &
fi
[ -c /dev/kvm ] || fail "no /dev/kvm in the lab: the kvm modules did not load"
grep -qw svm /proc/cpuinfo || fail "the lab CPU has no svm flag: QEMU did not emulate AMD-V"
[ -d /sys/module/kvm_amd ] || fail "kvm_amd is not loaded in the lab"
hostname typevisor-lab
set -o pipefail
# raw newlines on the console: the host adds carriage returns where it needs them (a terminal
# does, even in Node's raw mode, which keeps ONLCR)
stty -onlcr < /dev/ttyS0
echo "@@TVLAB:$nonce:start@@"
if [ "$tty" = none ]; then
  # the host's stdout is no terminal: give the command a pipe so it does not draw for one
  chroot /newroot /bin/sh /run/typevisor-lab.sh < /dev/null 2>&1 | cat
  code=$?
else
  case "$tty" in 0x*|*x0) ;; *) stty cols "\${tty%x*}" rows "\${tty#*x}" < /dev/ttyS0 ;; esac
  # the terminal's node inside the chroot, so that ttyname() in the command finds it
  if [ "$stdin" = console ]; then
    # interactive: the host forwards its raw terminal; the command owns ttyS0 as its
    # controlling tty, so ^C reaches it
    setsid -c chroot /newroot /bin/sh /run/typevisor-lab.sh < /newroot/dev/ttyS0 > /newroot/dev/ttyS0 2>&1
    code=$?
  else
    chroot /newroot /bin/sh /run/typevisor-lab.sh < /dev/null > /newroot/dev/ttyS0 2>&1
    code=$?
  fi
fi
# a fresh open of ttyS0: an interactive command's session hung its terminal up when it ended, and
# every descriptor opened on it before (this shell's stdout too) now fails with EIO
echo "@@TVLAB:$nonce:exit:$code@@" > /dev/ttyS0
poweroff -f
`;
