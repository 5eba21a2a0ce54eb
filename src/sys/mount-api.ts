/**
 * Bind mounts the daemon makes for a standby VMM's hand-off directory (docs/security.md "Standby
 * VMMs in the sandbox"): the directory becomes a shared mount of its own peer group, which the
 * standby's jail holds as a slave (typevisor-jail --handoff), and each file the VM needs is bound
 * under it with its flags set before it is attached, so the copy that propagates into the jail is
 * read-only (or not) from its first moment.
 *
 * Why the new mount API (open_tree(2), mount_setattr(2), move_mount(2); Linux 5.12) for the files:
 * with mount(2) a read-only bind is two steps (bind, then remount read-only), and the remount
 * changes only the daemon's own mount: the copy that propagated into the jail at the bind stays
 * writable (mount_namespaces(7): mount flags are per mount, not propagated). A detached clone
 * whose attributes are set before move_mount propagates with them.
 * Root only (CAP_SYS_ADMIN); the daemon's mount namespace is the host's.
 */
import { fstatSync } from "node:fs";
import koffi from "koffi";
import { TypevisorError } from "../errors.js";
import { SysError, errno } from "./libc.js";

const libc = koffi.load("libc.so.6");
const mountFn = libc.func("int mount(const char *source, const char *target, const char *fstype, unsigned long flags, const void *data)");
const umount2Fn = libc.func("int umount2(const char *target, int flags)");
// The new mount API through syscall(2): glibc wraps it only from 2.36, and a missing symbol would
// fail this module's load (and the daemon's) on an older C library. x86_64 numbers (arch/x86/entry/syscalls).
const syscallFn = libc.func("long syscall(long number, ...)");
const SYS_open_tree = 428;
const SYS_move_mount = 429;
const SYS_mount_setattr = 442;
const openTreeFn = (dfd: number, path: string, flags: number): number => Number(syscallFn(SYS_open_tree, "int", dfd, "str", path, "uint", flags));
const moveMountFn = (fromDfd: number, fromPath: string, toDfd: number, toPath: string, flags: number): number =>
  Number(syscallFn(SYS_move_mount, "int", fromDfd, "str", fromPath, "int", toDfd, "str", toPath, "uint", flags));
const mountSetattrFn = (dfd: number, path: string, flags: number, attr: Buffer, size: number): number =>
  Number(syscallFn(SYS_mount_setattr, "int", dfd, "str", path, "uint", flags, "void *", attr, "size_t", size));
const closeFn = libc.func("int close(int fd)");
const openFn = libc.func("int open(const char *path, int flags, int mode)");

const MS_BIND = 0x1000;
const MS_REC = 0x4000;
const MS_PRIVATE = 1 << 18;
const MS_SHARED = 1 << 20;
const MNT_DETACH = 2;
const AT_FDCWD = -100;
const AT_EMPTY_PATH = 0x1000;
const O_PATH = 0x200000;
const O_NOFOLLOW = 0x20000;
const O_CLOEXEC = 0x80000;
const OPEN_TREE_CLONE = 1;
const OPEN_TREE_CLOEXEC = 0x80000;
const MOVE_MOUNT_F_EMPTY_PATH = 0x4;
const MOUNT_ATTR_RDONLY = 0x1;
const MOUNT_ATTR_NOSUID = 0x2;
const MOUNT_ATTR_NODEV = 0x4;
const MOUNT_ATTR_NOEXEC = 0x8;
/** struct mount_attr, MOUNT_ATTR_SIZE_VER0: u64 attr_set, attr_clr, propagation, userns_fd. */
const MOUNT_ATTR_SIZE = 32;

function check(r: number, what: string): void {
  if (r < 0) throw new SysError(what, errno());
}

/** `dir` becomes a mount of its own (bound onto itself), shared in a peer group of its own. */
export function makeSharedMount(dir: string): void {
  check(mountFn(dir, dir, null, MS_BIND, null), `bind ${dir}`);
  // Private first: a bind inside a shared mount would join that mount's peer group (the host's /).
  check(mountFn(null, dir, null, MS_PRIVATE, null), `make ${dir} private`);
  check(mountFn(null, dir, null, MS_SHARED, null), `make ${dir} shared`);
}

/**
 * Bind `src` (a file or a directory, not followed if it is a symlink) onto `dst` (which exists, of
 * the same kind), nosuid, nodev, noexec, and read-only unless `rw`: the attributes are on the
 * mount before it is attached, so every copy propagated from it has them.
 */
export function attachBind(src: string, dst: string, rw: boolean): void {
  // Opened once, not followed, its kind checked on what was opened: the clone is of that object.
  const path = openFn(src, O_PATH | O_NOFOLLOW | O_CLOEXEC, 0);
  check(path, `open ${src}`);
  let fd: number;
  try {
    const st = fstatSync(path);
    if (!st.isFile() && !st.isDirectory()) throw new TypevisorError("SANDBOX", `${src} is neither a regular file nor a directory`);
    fd = openTreeFn(path, "", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH);
    check(fd, `open_tree ${src}`);
  } finally {
    closeFn(path);
  }
  try {
    const attr = Buffer.alloc(MOUNT_ATTR_SIZE);
    attr.writeBigUInt64LE(BigInt(MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC | (rw ? 0 : MOUNT_ATTR_RDONLY)), 0);
    // Safe: the kernel reads MOUNT_ATTR_SIZE bytes of `attr`, which lives through the call.
    check(mountSetattrFn(fd, "", AT_EMPTY_PATH, attr, MOUNT_ATTR_SIZE), `mount_setattr ${src}`);
    check(moveMountFn(fd, "", AT_FDCWD, dst, MOVE_MOUNT_F_EMPTY_PATH), `move_mount ${src} to ${dst}`);
  } finally {
    closeFn(fd);
  }
}

/**
 * `dir` and every mount under it leave their peer groups (MS_REC|MS_PRIVATE): their slaves in other
 * namespaces keep their copies, which no longer receive anything from here, so detaching these
 * afterwards does not reach them (mount_namespaces(7), "MS_PRIVATE"; sharedsubtree.rst).
 */
export function makePrivateTree(dir: string): void {
  check(mountFn(null, dir, null, MS_REC | MS_PRIVATE, null), `make ${dir} private`);
}

/** Detach whatever is mounted at `path` and under it (MNT_DETACH); false when nothing was. */
export function detachMount(path: string): boolean {
  if (umount2Fn(path, MNT_DETACH) === 0) return true;
  const e = errno();
  // EINVAL: not a mount point; ENOENT: not there.
  if (e === 22 || e === 2) return false;
  throw new SysError(`umount ${path}`, e);
}

