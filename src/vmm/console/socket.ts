/**
 * The guest's serial console on a unix stream socket: every client receives
 * the output produced while it is connected, and what any client sends is
 * typed into the guest's UART. Several clients may share it (a supervisor's
 * log tailer and a user's interactive session, say).
 */
import { createServer, type Server, type Socket } from "node:net";
import { lstatSync, unlinkSync } from "node:fs";
import { listenOnFd, listenOwnerOnly } from "../../sys/owner-only-socket.js";
import { TypevisorError } from "../../errors.js";

/**
 * A client that stops reading must not make the VMM buffer without bound (nor
 * stall the guest): past this much unsent output it is disconnected.
 */
export const MAX_CLIENT_BACKLOG = 1024 * 1024;

export class ConsoleSocket {
  private readonly clients = new Set<Socket>();
  private server: Server | undefined;

  private constructor(readonly path: string) {}

  /** Listen on `path`, replacing a stale socket file (a dead VMM's) but never another kind of file. */
  static async listen(path: string, onInput: (bytes: Uint8Array) => void, listenFd?: number): Promise<ConsoleSocket> {
    if (listenFd === undefined) removeStaleSocket(path, "--console-socket");
    const cs = new ConsoleSocket(path);
    const server = createServer((c) => {
      cs.clients.add(c);
      c.on("data", (d: Buffer) => onInput(d));
      c.on("error", () => c.destroy());
      c.on("close", () => cs.clients.delete(c));
    });
    // owner-only whatever the caller's umask: a client can type into the guest's console
    await (listenFd !== undefined ? listenOnFd(server, listenFd) : listenOwnerOnly(server, path)).catch((e: unknown) => {
      throw new TypevisorError("CONSOLE_SOCKET", `cannot listen on --console-socket ${path}: ${(e as Error).message}`);
    });
    cs.server = server;
    return cs;
  }

  get clientCount(): number {
    return this.clients.size;
  }

  broadcast(bytes: Uint8Array): void {
    for (const c of this.clients) {
      if (c.writableLength > MAX_CLIENT_BACKLOG) {
        c.destroy();
        continue;
      }
      c.write(bytes);
    }
  }

  /** Flush what clients can take, disconnect them, and remove the socket file. */
  async close(): Promise<void> {
    for (const c of this.clients) c.end();
    const s = this.server;
    this.server = undefined;
    if (s !== undefined) {
      // server.close waits for open connections; give a slow client a moment, then cut it.
      const t = setTimeout(() => {
        for (const c of this.clients) c.destroy();
      }, 1000);
      await new Promise<void>((resolve) => s.close(() => resolve()));
      clearTimeout(t);
    }
    try {
      unlinkSync(this.path);
    } catch {
      // already gone (net.Server removes it on close on some platforms)
    }
  }
}

/** Unlink a leftover unix socket at `path`; refuse to delete anything that is not a socket. */
export function removeStaleSocket(path: string, flag: string): void {
  let st;
  try {
    st = lstatSync(path);
  } catch {
    return; // nothing there
  }
  if (!st.isSocket()) throw new TypevisorError("INVALID_ARGUMENT", `${flag} ${path} exists and is not a socket; refusing to replace it`);
  unlinkSync(path);
}
