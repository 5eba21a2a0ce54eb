/**
 * Where the daemon keeps things under its home directory:
 *   typevisor.db            the inventory (SQLite)
 *   typevisor.sock          the API socket
 *   audit.head              the audit log's last entry (seq and hash): a cut at its end shows (audit.ts)
 *   daemon.log{,.1}         the daemon's own log (pino JSON lines), rotated by size (logs.ts)
 *   tls/                    the HTTPS certificate the daemon made (tls.ts)
 *   vms/<id>/               one VM: its disks, kernel and initrd copies, VMM log (the daemon's; its VMM cannot write here)
 *   vms/<id>/stats          the VMM's stats page (vmm/stats/layout.ts): the VMM writes its content, the daemon reads it
 *   vms/<id>/out/           what the VMM writes: console logs, exit file (a sandboxed VMM's uid owns it: untrusted)
 *   vms/<id>/root/          where the sandboxed VMM's root is mounted, in its own mount namespace (empty on the host)
 *   run/<id>.{api,con}      the VMM's control and console sockets (short paths: sun_path is 108 bytes, unix(7))
 */
import { join } from "node:path";
import { TypevisorError } from "../errors.js";

export interface VmPaths {
  dir: string;
  apiSocket: string;
  consoleSocket: string;
  consoleLog: string;
  vmmLog: string;
  exitFile: string;
  statsFile: string;
  outDir: string;
  jailRoot: string;
}

const SUN_PATH_MAX = 107;

export function homePaths(home: string): { db: string; socket: string; vms: string; run: string; auditHead: string; daemonLog: string } {
  return { db: join(home, "typevisor.db"), socket: join(home, "typevisor.sock"), vms: join(home, "vms"), run: join(home, "run"), auditHead: join(home, "audit.head"), daemonLog: join(home, "daemon.log") };
}

export function vmPaths(home: string, id: string): VmPaths {
  const h = homePaths(home);
  const p = {
    dir: join(h.vms, id),
    apiSocket: join(h.run, `${id}.api`),
    consoleSocket: join(h.run, `${id}.con`),
    consoleLog: join(h.vms, id, "out", "console.log"),
    vmmLog: join(h.vms, id, "vmm.log"),
    exitFile: join(h.vms, id, "out", "exit.json"),
    statsFile: join(h.vms, id, "stats"),
    outDir: join(h.vms, id, "out"),
    jailRoot: join(h.vms, id, "root"),
  };
  return p;
}

/** Fail at daemon start, not at the first VM, when socket paths would not fit in sun_path. */
export function checkSocketPaths(home: string): void {
  const longest = vmPaths(home, "x".repeat(12)).apiSocket;
  const h = homePaths(home);
  for (const p of [longest, h.socket]) {
    if (Buffer.byteLength(p) > SUN_PATH_MAX) {
      throw new TypevisorError("HOME_PATH_TOO_LONG", `${p} is longer than a unix socket path may be (${SUN_PATH_MAX} bytes)`, { hint: "use a shorter --home" });
    }
  }
}
