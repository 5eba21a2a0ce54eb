/**
 * The daemon's relay for a sandboxed VMM's migration stream (docs/migration.md, "Under the VMM
 * sandbox"). A jailed VMM has a network namespace of its own with no interface in it
 * (docs/security.md): it can neither reach the other host nor be reached. So its daemon carries
 * the stream: the VMM speaks plain frames over a unix socket in its own `out/` directory (the one
 * directory bound into its root), and the daemon speaks TLS 1.3 with the other daemon, with the
 * same one-time certificates and pinned fingerprints the VMMs use without the sandbox
 * (vmm/migration/transport.ts). The daemon reads none of the frames: the destination VMM checks
 * them as it does any stream (everything in it is hostile input to that VMM).
 *
 *   source VMM --unix--> source daemon ==TLS==> destination daemon --unix--> destination VMM
 */
import { chmodSync, chownSync, closeSync, rmSync } from "node:fs";
import { connect, createServer, type Socket } from "node:net";
import { TypevisorError } from "../errors.js";
import { openSocketNoFollow } from "../sys/untrusted-file.js";
import { listenStream, openStream, type StreamTls } from "../vmm/migration/transport.js";

/** Pipe `a` and `b` both ways; either side's end or error ends both. */
function splice(a: Socket, b: Socket): void {
  const end = (): void => {
    a.destroy();
    b.destroy();
  };
  for (const s of [a, b]) {
    s.on("error", end);
    s.on("close", end);
  }
  a.pipe(b);
  b.pipe(a);
}

export interface Relay {
  /** Stop: the listener and any connection it carries. */
  close(): void;
}

/**
 * Source side: listen on `path` (in the VMM's out/ directory, connectable by its uid only) for the
 * VMM's one connection (`POST /migrate {"to": "unix:PATH"}`), and carry it to `to` over TLS.
 * @throws TypevisorError UNIX_SOCKET when the socket cannot be made
 */
export async function relayOutgoing(path: string, owner: { uid: number; gid: number }, to: string, tls: StreamTls, onError: (e: Error) => void): Promise<Relay> {
  const held: Socket[] = [];
  const server = createServer((vmm) => {
    server.close(); // one stream
    held.push(vmm);
    vmm.pause();
    vmm.on("error", () => undefined);
    openStream(to, { tls }, (s) => held.push(s)).then(
      (peer) => {
        vmm.resume();
        splice(vmm, peer);
      },
      (e: unknown) => {
        // The VMM sees the stream cut before anything was sent: its migration fails, and the guest runs on there.
        onError(e as Error);
        vmm.destroy();
      },
    );
  });
  // What the VMM's uid left there (its own directory) goes: unlink does not follow a symlink.
  rmSync(path, { force: true });
  await new Promise<void>((resolve, reject) => {
    server.once("error", (e) => reject(new TypevisorError("UNIX_SOCKET", `cannot listen on ${path}: ${e.message}`)));
    server.listen(path, resolve);
  });
  // Bound by root: the VMM's uid alone may connect (connect(2) needs write permission on the
  // socket). Through the descriptor: the VMM owns the directory and could swap in a symlink to a
  // host file between the bind and a chown by name.
  try {
    const fd = openSocketNoFollow(path);
    try {
      chownSync(`/proc/self/fd/${fd}`, owner.uid, owner.gid);
      chmodSync(`/proc/self/fd/${fd}`, 0o600);
    } finally {
      closeSync(fd);
    }
  } catch (e) {
    server.close();
    throw new TypevisorError("UNIX_SOCKET", `cannot hand ${path} to the VMM: ${(e as Error).message}`);
  }
  return {
    close: () => {
      server.close();
      for (const s of held) s.destroy();
    },
  };
}

/**
 * Destination side: listen on `endpoint` (tcp:HOST:PORT, TLS, the source daemon's certificate
 * pinned) and carry the one authenticated connection to the VMM's unix socket `vmmPath`.
 * Resolves once listening.
 */
export async function relayIncoming(endpoint: string, tls: StreamTls, vmmPath: string, log: (line: string) => void): Promise<Relay> {
  const held: Socket[] = [];
  const listener = listenStream(endpoint, { tls }, log);
  await listener.listening;
  listener.accepted.then(
    (peer) => {
      held.push(peer);
      peer.pause();
      // The VMM owns the directory: connect to the socket it bound, never through a symlink put there.
      let fd: number;
      try {
        fd = openSocketNoFollow(vmmPath);
      } catch (e) {
        log(`typevisor: the incoming VMM's socket ${vmmPath}: ${(e as Error).message}`);
        peer.destroy();
        return;
      }
      const vmm = connect(`/proc/self/fd/${fd}`);
      held.push(vmm);
      let connected = false;
      vmm.once("connect", () => {
        connected = true;
        closeSync(fd);
        peer.resume();
        splice(peer, vmm);
      });
      vmm.once("error", (e) => {
        if (connected) return; // splice's
        closeSync(fd);
        log(`typevisor: the incoming VMM's socket ${vmmPath}: ${e.message}`);
        peer.destroy();
      });
    },
    () => undefined, // closed before a peer came
  );
  return {
    close: () => {
      listener.close();
      for (const s of held) s.destroy();
    },
  };
}
