/*
 * typevisor-jail: start one VMM process with least privilege (docs/security.md, "The VMM sandbox").
 *
 * The daemon (root) runs this helper instead of the VMM; it builds the sandbox and execs the VMM
 * inside it. Every input comes from argv, written by src/control/sandbox/sandbox.ts; nothing is
 * read from the environment, which is passed on to the VMM unchanged. Steps, in order:
 *
 *   1. join the VM's cgroup (cgroup.procs; before the fork, so the VMM is charged from its first page);
 *   2. unshare(2) new mount, PID, IPC, UTS and network namespaces;
 *   3. fork(2): the child is PID 1 of the new PID namespace and becomes the VMM; this process stays
 *      as its waiter, reports the child's pid (as the host sees it) on --pid-fd, forwards SIGTERM,
 *      SIGINT and SIGHUP to it, and exits as it exits (same code, or killed by the same signal),
 *      so the daemon's child-exit handling sees the VMM's own ending;
 *   4. in the child: make every mount private (no propagation back to the host; with --handoff
 *      a slave: mounts the daemon makes later under the hand-off directory reach this namespace,
 *      nothing goes back), open every
 *      --bind source with O_PATH|O_NOFOLLOW (a symlink put where a file was expected is refused),
 *      mount a tmpfs on --root and bind each source at its own path under it (read-only unless
 *      :rw; nosuid, nodev; noexec unless :exec), a /dev with fresh device nodes (null, zero, full,
 *      random, urandom, and each --dev owned by the VM's uid), a /proc of the new PID namespace and
 *      a small /tmp, then pivot_root(2) into it and detach the old root: nothing else of the
 *      host's filesystem is reachable;
 *   5. set the resource limits, close every descriptor but 0-2 and --keep-fd, empty the capability
 *      bounding set and the inheritable set, setgroups (none, or the --group ids: a snapshot's
 *      group, so the VMM that restores it can read its files), setresgid, setresuid to the VM's ids
 *      (which clears the permitted and effective sets, capabilities(7) "Effect of user ID changes
 *      on capabilities"), PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG (the VMM dies with its waiter), and
 *      install the seccomp filters given in hex (built by src/sys/seccomp.ts), last, since they
 *      refuses mount(2) and friends;
 *   6. execve(2) the VMM.
 *
 * Written in C rather than in the daemon's TypeScript because unshare(CLONE_NEWNS) needs a process
 * that shares its filesystem context with no other thread (unshare(2): CLONE_NEWNS implies CLONE_FS,
 * EINVAL when the fs_struct is shared), and Node is never single-threaded; and because the fork
 * into the new PID namespace must be followed by nothing but these system calls.
 * Exit status of the helper itself on a set-up failure: 125 (the daemon's VMM log says why).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_ITEMS 256
#define SETUP_FAILED 125

struct bind {
  const char *path;
  int rw, exec;
  int fd;
  struct stat st;
};

static struct bind binds[MAX_ITEMS];
static int nbinds;
static const char *devs[MAX_ITEMS];
static int ndevs;
static const char *symlinks[MAX_ITEMS]; /* "PATH=TARGET" */
static int nsymlinks;
static int keep[MAX_ITEMS];
static int nkeep;
static struct { int resource; rlim_t value; } limits[16];
static int nlimits;
static const char *root, *cgroup, *hostname, *seccomp_hex, *seccomp_quiet_hex;
/*
 * --handoff SRC=DST: a standby VMM's jail (docs/security.md "Standby VMMs in the sandbox"). SRC is a
 * directory the daemon made a shared mount (its own peer group); it is bound at DST (the daemon's
 * home) as a slave, so the files the daemon binds under SRC when it hands this VMM a VM appear
 * here at the paths they have on the host. Read-only, nosuid, nodev, noexec like a data bind;
 * each file bound under it (before the jail starts: the template's saved state; later: the VM's
 * files) carries its own flags.
 */
static const char *handoff_src, *handoff_dst;
static long uid = -1, gid = -1;
static int die_with_parent;
static gid_t groups[16]; /* supplementary groups: a snapshot's group, for the VMM that restores it (sandbox.ts) */
static int ngroups;
static int pid_fd = -1;
static volatile pid_t child;

static void die(const char *fmt, ...) {
  va_list ap;
  int e = errno;
  fprintf(stderr, "typevisor-jail: ");
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fprintf(stderr, e != 0 ? ": %s\n" : "\n", strerror(e));
  _exit(SETUP_FAILED);
}

static long number(const char *s, long max) {
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno != 0 || *s == '\0' || *end != '\0' || v < 0 || v > max) {
    errno = 0;
    die("not a number from 0 to %ld: \"%s\"", max, s);
  }
  return v;
}

/* Paths are absolute, without "." or ".." components, so the target under --root is the same path. */
static void check_path(const char *p) {
  errno = 0;
  int bad = p[0] != '/' || strlen(p) >= 2048;
  for (const char *s = p; !bad && (s = strchr(s, '/')) != NULL; s++) {
    const char *c = s + 1;
    size_t n = strcspn(c, "/");
    bad = (n == 1 && c[0] == '.') || (n == 2 && c[0] == '.' && c[1] == '.');
  }
  if (bad) die("not a plain absolute path: \"%s\"", p);
}

static void mkdirs(const char *path, mode_t mode) {
  char buf[4096];
  snprintf(buf, sizeof buf, "%s", path);
  for (char *s = buf + 1; *s != '\0'; s++) {
    if (*s != '/') continue;
    *s = '\0';
    if (mkdir(buf, mode) != 0 && errno != EEXIST) die("mkdir %s", buf);
    *s = '/';
  }
  if (mkdir(buf, mode) != 0 && errno != EEXIST) die("mkdir %s", buf);
}

static void under_root(char *out, size_t n, const char *p) {
  if ((size_t)snprintf(out, n, "%s%s", root, p) >= n) {
    errno = 0;
    die("path too long: %s", p);
  }
}

static void parent_dirs(const char *target) {
  char dir[4096];
  snprintf(dir, sizeof dir, "%s", target);
  char *slash = strrchr(dir, '/');
  if (slash != NULL && slash != dir) {
    *slash = '\0';
    mkdirs(dir, 0755);
  }
}

static void forward(int sig) {
  if (child > 0) kill(child, sig);
}

static void close_others(void) {
  /* Descriptors above the highest kept one in one call, then the gaps below it. */
  int maxkeep = 2;
  for (int i = 0; i < nkeep; i++) if (keep[i] > maxkeep) maxkeep = keep[i];
  if (syscall(SYS_close_range, (unsigned)maxkeep + 1, ~0U, 0) != 0) {
    for (int fd = maxkeep + 1; fd < 65536; fd++) close(fd);
  }
  for (int fd = 3; fd < maxkeep; fd++) {
    int kept = 0;
    for (int i = 0; i < nkeep; i++) kept |= keep[i] == fd;
    if (!kept) close(fd);
  }
}

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

/* One filter given in hex; `log`: SECCOMP_FILTER_FLAG_LOG. */
static void install_filter(const char *hex, int log) {
  size_t len = strlen(hex);
  errno = 0;
  if (len == 0 || len % 16 != 0 || len / 16 > BPF_MAXINSNS) die("--seccomp: not a list of 8-byte BPF instructions in hex");
  size_t n = len / 16;
  unsigned char *bytes = malloc(len / 2);
  if (bytes == NULL) die("malloc");
  for (size_t i = 0; i < len / 2; i++) {
    int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) die("--seccomp: not hex");
    bytes[i] = (unsigned char)(hi << 4 | lo);
  }
  /* struct sock_filter is {u16 code; u8 jt; u8 jf; u32 k}: 8 bytes, as sandbox.ts writes them (little-endian). */
  struct sock_fprog prog = { .len = (unsigned short)n, .filter = (struct sock_filter *)bytes };
  /* TSYNC: one thread here, but it costs nothing and says every thread of the process is covered.
   * LOG: every refusal goes to the kernel log (audit type 1326: pid, program, system call number),
   * so a call the allowlist lacks, or an attacker's probing, is seen (Linux 4.14; without it, EINVAL:
   * installed without). */
  unsigned flags = SECCOMP_FILTER_FLAG_TSYNC | (log ? SECCOMP_FILTER_FLAG_LOG : 0);
  if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog) != 0) {
    if (!log || errno != EINVAL || syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &prog) != 0) die("seccomp(SECCOMP_SET_MODE_FILTER)");
  }
  free(bytes);
}

/*
 * --seccomp (logged), then --seccomp-quiet (not logged). The kernel runs every filter and keeps the
 * strictest answer; between equal answers, the newest filter's, and that filter's LOG flag decides
 * whether it is logged (kernel/seccomp.c seccomp_run_filters). So a refusal expected all day (clone3,
 * which Node tries for each new thread) is answered by the quiet filter and stays out of the log.
 */
static void install_seccomp(void) {
  install_filter(seccomp_hex, 1);
  if (seccomp_quiet_hex != NULL) install_filter(seccomp_quiet_hex, 0);
}

static void drop_capabilities(void) {
  /* The bounding set first (needs CAP_SETPCAP, which root still has), then the inheritable set. */
  for (int cap = 0; cap < 64; cap++) {
    if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno != EINVAL) die("PR_CAPBSET_DROP %d", cap);
  }
  struct __user_cap_header_struct h = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
  struct __user_cap_data_struct d[2];
  if (syscall(SYS_capget, &h, d) != 0) die("capget");
  for (int i = 0; i < 2; i++) d[i].inheritable = 0;
  if (syscall(SYS_capset, &h, d) != 0) die("capset");
  if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && errno != EINVAL) die("PR_CAP_AMBIENT_CLEAR_ALL");
  if (setgroups((size_t)ngroups, ngroups > 0 ? groups : NULL) != 0) die("setgroups");
  if (setresgid((gid_t)gid, (gid_t)gid, (gid_t)gid) != 0) die("setresgid %ld", gid);
  if (setresuid((uid_t)uid, (uid_t)uid, (uid_t)uid) != 0) die("setresuid %ld", uid);
  /* A return to root must be impossible now; check rather than trust. */
  if (setresuid(0, 0, 0) == 0) {
    errno = 0;
    die("still able to become root after dropping privileges");
  }
}

static void build_root(void) {
  char t[4096];
  /* With a hand-off: slaves, so the hand-off's copy here still receives the daemon's mounts
   * (mount_namespaces(7), "MS_SLAVE"); every other bind is made private once it is in place. */
  if (mount(NULL, "/", NULL, MS_REC | (handoff_src != NULL ? MS_SLAVE : MS_PRIVATE), NULL) != 0) die("making mounts private");
  /* Sources are opened in the host's view, before anything is mounted over it. */
  for (int i = 0; i < nbinds; i++) {
    binds[i].fd = open(binds[i].path, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (binds[i].fd < 0) die("open %s", binds[i].path);
    if (fstat(binds[i].fd, &binds[i].st) != 0) die("fstat %s", binds[i].path);
    errno = 0;
    if (!S_ISDIR(binds[i].st.st_mode) && !S_ISREG(binds[i].st.st_mode)) die("%s is neither a directory nor a regular file", binds[i].path);
  }
  if (mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m,nr_inodes=4096") != 0) die("tmpfs on %s", root);
  /* /tmp first: binds of paths under /tmp (a test's home) then land on it, not under it. */
  under_root(t, sizeof t, "/tmp");
  mkdirs(t, 01777);
  if (mount("tmpfs", t, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=16m,nr_inodes=1024") != 0) die("tmpfs on /tmp");
  for (int i = 0; i < nbinds; i++) {
    under_root(t, sizeof t, binds[i].path);
    parent_dirs(t);
    if (S_ISDIR(binds[i].st.st_mode)) mkdirs(t, 0755);
    else {
      int fd = open(t, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
      if (fd < 0) die("creating %s", t);
      close(fd);
    }
    char src[64];
    snprintf(src, sizeof src, "/proc/self/fd/%d", binds[i].fd);
    /* MS_REC for directories: /usr may hold mounts of its own. */
    if (mount(src, t, NULL, MS_BIND | (S_ISDIR(binds[i].st.st_mode) ? MS_REC : 0), NULL) != 0) die("bind %s", binds[i].path);
    unsigned long flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | (binds[i].rw ? 0 : MS_RDONLY) | (binds[i].exec ? 0 : MS_NOEXEC);
    if (mount(NULL, t, NULL, flags, NULL) != 0) die("remount %s", binds[i].path);
    if (handoff_src != NULL && mount(NULL, t, NULL, MS_REC | MS_PRIVATE, NULL) != 0) die("making %s private", binds[i].path);
    close(binds[i].fd);
  }
  if (handoff_src != NULL) {
    /* Opened as the others: a symlink is refused; a slave of the daemon's shared mount (above). */
    int fd = open(handoff_src, O_PATH | O_NOFOLLOW | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) die("open %s", handoff_src);
    under_root(t, sizeof t, handoff_dst);
    mkdirs(t, 0755);
    char src[64];
    snprintf(src, sizeof src, "/proc/self/fd/%d", fd);
    /* MS_REC: what the daemon bound there before the jail started (the template's saved state) comes too. */
    if (mount(src, t, NULL, MS_BIND | MS_REC, NULL) != 0) die("bind %s", handoff_src);
    if (mount(NULL, t, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) die("remount %s", handoff_src);
    close(fd);
  }
  for (int i = 0; i < nsymlinks; i++) {
    char path[4096];
    snprintf(path, sizeof path, "%s", symlinks[i]);
    char *eq = strchr(path, '=');
    *eq = '\0';
    under_root(t, sizeof t, path);
    parent_dirs(t);
    if (symlink(eq + 1, t) != 0) die("symlink %s", path);
  }
  /* /dev: fresh nodes, not the host's /dev (which holds every disk of the host). */
  under_root(t, sizeof t, "/dev");
  mkdirs(t, 0755);
  if (mount("tmpfs", t, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k,nr_inodes=64") != 0) die("tmpfs on /dev");
  static const struct { const char *name; int major, minor; } std[] = { { "null", 1, 3 }, { "zero", 1, 5 }, { "full", 1, 7 }, { "random", 1, 8 }, { "urandom", 1, 9 } };
  for (size_t i = 0; i < sizeof std / sizeof std[0]; i++) {
    snprintf(t, sizeof t, "%s/dev/%s", root, std[i].name);
    if (mknod(t, S_IFCHR | 0666, makedev(std[i].major, std[i].minor)) != 0) die("mknod %s", t);
    if (chmod(t, 0666) != 0) die("chmod %s", t); /* mknod applies the umask */
  }
  for (int i = 0; i < ndevs; i++) {
    struct stat st;
    if (stat(devs[i], &st) != 0) die("stat %s", devs[i]);
    errno = 0;
    if (!S_ISCHR(st.st_mode)) die("%s is not a character device", devs[i]);
    under_root(t, sizeof t, devs[i]);
    parent_dirs(t);
    if (mknod(t, S_IFCHR | 0600, st.st_rdev) != 0) die("mknod %s", t);
    if (chown(t, (uid_t)uid, (gid_t)gid) != 0) die("chown %s", t);
  }
  under_root(t, sizeof t, "/proc");
  mkdirs(t, 0555);
  /* This process is in the new PID namespace: the proc mounted here shows only its processes. */
  if (mount("proc", t, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) die("proc");
  /* pivot_root(".", "."): the old root is stacked under the new one and detached at once (pivot_root(2) NOTES). */
  if (chdir(root) != 0) die("chdir %s", root);
  if (syscall(SYS_pivot_root, ".", ".") != 0) die("pivot_root");
  if (umount2(".", MNT_DETACH) != 0) die("detaching the old root");
  if (chdir("/") != 0) die("chdir /");
  if (mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) != 0) die("read-only /");
}

int main(int argc, char **argv) {
  int i = 1;
  for (; i < argc; i++) {
    const char *a = argv[i];
    const char *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (strcmp(a, "--") == 0) {
      i++;
      break;
    }
    errno = 0;
    if (v == NULL) die("%s needs a value", a);
    i++;
    if (strcmp(a, "--uid") == 0) uid = number(v, 0xfffffffeL);
    else if (strcmp(a, "--gid") == 0) gid = number(v, 0xfffffffeL);
    else if (strcmp(a, "--root") == 0) check_path(root = v);
    else if (strcmp(a, "--cgroup") == 0) check_path(cgroup = v);
    else if (strcmp(a, "--hostname") == 0) hostname = v;
    else if (strcmp(a, "--die-with-parent") == 0) die_with_parent = strcmp(v, "1") == 0;
    else if (strcmp(a, "--seccomp") == 0) seccomp_hex = v;
    else if (strcmp(a, "--seccomp-quiet") == 0) seccomp_quiet_hex = v;
    else if (strcmp(a, "--pid-fd") == 0) pid_fd = (int)number(v, 65535);
    else if (strcmp(a, "--group") == 0 && ngroups < 16) {
      groups[ngroups] = (gid_t)number(v, 0xfffffffeL);
      if (groups[ngroups] == 0) die("--group 0 (root's group) is refused");
      ngroups++;
    } else if (strcmp(a, "--keep-fd") == 0 && nkeep < MAX_ITEMS) keep[nkeep++] = (int)number(v, 65535);
    else if (strcmp(a, "--dev") == 0 && ndevs < MAX_ITEMS) check_path(devs[ndevs++] = v);
    else if (strcmp(a, "--symlink") == 0 && nsymlinks < MAX_ITEMS) {
      const char *eq = strchr(v, '=');
      if (eq == NULL) die("--symlink PATH=TARGET");
      char p[4096];
      snprintf(p, sizeof p, "%.*s", (int)(eq - v), v);
      check_path(p);
      symlinks[nsymlinks++] = v;
    } else if (strcmp(a, "--bind") == 0 && nbinds < MAX_ITEMS) {
      /* PATH[:rw][:exec] */
      char *p = strdup(v);
      struct bind *b = &binds[nbinds++];
      for (char *c; (c = strrchr(p, ':')) != NULL;) {
        if (strcmp(c, ":rw") == 0) b->rw = 1;
        else if (strcmp(c, ":exec") == 0) b->exec = 1;
        else if (strcmp(c, ":ro") != 0) break;
        *c = '\0';
      }
      check_path(p);
      b->path = p;
    } else if (strcmp(a, "--handoff") == 0 && v != NULL) {
      char *p = strdup(v);
      char *eq = strchr(p, '=');
      if (eq == NULL) die("--handoff SRC=DST");
      *eq = '\0';
      check_path(p);
      check_path(eq + 1);
      handoff_src = p;
      handoff_dst = eq + 1;
    } else if (strcmp(a, "--rlimit") == 0 && nlimits < 16) {
      const char *eq = strchr(v, '=');
      if (eq == NULL) die("--rlimit NAME=VALUE");
      int r;
      if (strncmp(v, "nofile=", 7) == 0) r = RLIMIT_NOFILE;
      else if (strncmp(v, "core=", 5) == 0) r = RLIMIT_CORE;
      else if (strncmp(v, "nproc=", 6) == 0) r = RLIMIT_NPROC;
      else if (strncmp(v, "fsize=", 6) == 0) r = RLIMIT_FSIZE;
      else if (strncmp(v, "nice=", 5) == 0) r = RLIMIT_NICE;
      else die("--rlimit: unknown resource in \"%s\"", v);
      limits[nlimits].resource = r;
      limits[nlimits++].value = (rlim_t)number(eq + 1, 0x7fffffffffffffffL);
    } else die("unknown option %s", a);
  }
  errno = 0;
  if (i >= argc) die("no command after --");
  if (uid <= 0 || gid <= 0) die("--uid and --gid must be given and not 0");
  if (root == NULL || seccomp_hex == NULL) die("--root and --seccomp must be given");
  if (geteuid() != 0) die("must run as root (the daemon starts it)");

  /* `run --sandbox` by hand: the VMM must not outlive the command that started it (as without
   * --sandbox), so this waiter dies with it, and the VMM with this waiter (PDEATHSIG below). The
   * daemon does not ask for it: its VMMs outlive a daemon restart. */
  if (die_with_parent && prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0) die("PR_SET_PDEATHSIG");
  /* The daemon's umask is 077: the jail's directories must be traversable by the VM's uid. */
  umask(022);
  if (cgroup != NULL) {
    char procs[4096];
    snprintf(procs, sizeof procs, "%s/cgroup.procs", cgroup);
    int fd = open(procs, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, "0\n", 2) != 2) die("joining the cgroup %s", cgroup);
    close(fd);
  }
  if (unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET) != 0) die("unshare");
  child = fork();
  if (child < 0) die("fork");
  if (child > 0) {
    /* The waiter: report the VMM's pid, pass on stop signals, end as it ends. */
    if (pid_fd >= 0) {
      char line[32];
      int n = snprintf(line, sizeof line, "%d\n", (int)child);
      if (write(pid_fd, line, (size_t)n) != n) { /* the daemon is gone: the VMM runs on regardless */ }
      close(pid_fd);
    }
    nkeep = 0;
    close_others();
    struct sigaction sa = { .sa_handler = forward };
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    int status;
    while (waitpid(child, &status, 0) < 0) {
      if (errno != EINTR) return SETUP_FAILED;
    }
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    int sig = WTERMSIG(status);
    signal(sig, SIG_DFL);
    /* No core of this process (the signal may be SIGSEGV). */
    struct rlimit zero = { 0, 0 };
    setrlimit(RLIMIT_CORE, &zero);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, sig);
    sigprocmask(SIG_UNBLOCK, &set, NULL);
    raise(sig);
    return 128 + sig;
  }
  /* The VMM-to-be: PID 1 of its namespace. */
  if (pid_fd >= 0) close(pid_fd);
  if (hostname != NULL && sethostname(hostname, strlen(hostname)) != 0) die("sethostname");
  build_root();
  for (int l = 0; l < nlimits; l++) {
    struct rlimit r = { limits[l].value, limits[l].value };
    if (setrlimit(limits[l].resource, &r) != 0) {
      /* RLIMIT_NICE only lets the VMM take back a nice value it gave up itself (its vCPU threads
         during a migration); raising its hard limit needs CAP_SYS_RESOURCE, which a container's
         root may lack: the VMM then runs without it, as an unjailed unprivileged one does. */
      if (limits[l].resource == RLIMIT_NICE && errno == EPERM) continue;
      die("setrlimit");
    }
  }
  close_others();
  drop_capabilities();
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) die("PR_SET_NO_NEW_PRIVS");
  /* After the uid change, which clears it (prctl(2) PR_SET_PDEATHSIG). */
  if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0) die("PR_SET_PDEATHSIG");
  install_seccomp();
  execv(argv[i], &argv[i]);
  die("exec %s", argv[i]);
  return SETUP_FAILED;
}
