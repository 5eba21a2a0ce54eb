/**
 * Listen on a unix socket path that only its owner can connect to, whatever the umask. Whoever can
 * connect to a VMM's control or console socket can stop the VM or type into its console, so the
 * mode must be 0600 from the first moment the path exists: the socket is bound inside a fresh 0700
 * directory (mkdtemp), narrowed to 0600 there, and renamed into place (a bound socket keeps
 * working under its new name; unix(7)). A chmod after listen() would leave a window in which the
 * path is there with the umask's mode.
 */
import { chmodSync, lstatSync, mkdtempSync, renameSync, rmSync } from "node:fs";
import type { Server } from "node:net";
import { dirname, join } from "node:path";

/** sun_path holds 108 bytes with its NUL (unix(7)). */
const SUN_PATH_MAX = 107;

/**
 * Listen on a socket that is already bound and listening, inherited as descriptor `fd` (its
 * path and mode are its creator's business: the daemon binds a sandboxed VMM's sockets).
 */
export async function listenOnFd(server: Server, fd: number): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen({ fd }, () => {
      server.off("error", reject);
      resolve();
    });
  });
}

export async function listenOwnerOnly(server: Server, path: string): Promise<void> {
  const dir = mkdtempSync(join(dirname(path), ".tvs-"));
  const tmp = join(dir, "s");
  try {
    // a private directory next to a path near the limit may be too long to bind in
    const bindAt = Buffer.byteLength(tmp) <= SUN_PATH_MAX ? tmp : undefined;
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(bindAt ?? path, () => {
        server.off("error", reject);
        resolve();
      });
    });
    if (bindAt !== undefined) {
      chmodSync(bindAt, 0o600);
      renameSync(bindAt, path);
      // node:net removes the socket file when the server closes, but by the name it was bound at:
      // remove it here, unless the path is by then another socket (a newer listener's)
      const ino = lstatSync(path).ino;
      server.once("close", () => {
        try {
          if (lstatSync(path).ino === ino) rmSync(path, { force: true });
        } catch {
          // already gone
        }
      });
    } else {
      chmodSync(path, 0o600);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
