/**
 * The host end of a guest network test (lab): a TAP with an address, and two TCP servers on it:
 * port `basePort` sends `bytes` random bytes to whoever connects and closes; `basePort + 1`
 * collects what the guest sends until it has as many (the guest's busybox nc does not close on end
 * of input, so the host closes once it has it all).
 */
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { createServer, type Server } from "node:net";
import { SYNC_TIMEOUT_MS } from "./sync-timeout.js";

export interface TapPeer {
  /** What the send port gives the guest. */
  toGuest: Buffer;
  /** What the collect port has received so far. */
  fromGuest(): Buffer;
  /** Close both servers and delete the TAP. */
  close(): void;
}

export async function tapPeer(tap: string, hostAddr: string, basePort: number, bytes: number): Promise<TapPeer> {
  execFileSync("ip", ["tuntap", "add", "dev", tap, "mode", "tap"], { timeout: SYNC_TIMEOUT_MS });
  execFileSync("ip", ["addr", "add", `${hostAddr}/24`, "dev", tap], { timeout: SYNC_TIMEOUT_MS });
  execFileSync("ip", ["link", "set", tap, "up"], { timeout: SYNC_TIMEOUT_MS });
  const toGuest = randomBytes(bytes);
  let fromGuest = Buffer.alloc(0);
  const servers: Server[] = [
    createServer((s) => s.end(toGuest)),
    createServer((s) =>
      s.on("data", (d: Buffer) => {
        fromGuest = Buffer.concat([fromGuest, d]);
        if (fromGuest.length >= bytes) s.end();
      }),
    ),
  ];
  await Promise.all(servers.map((s, i) => new Promise<void>((r) => s.listen(basePort + i, hostAddr, r))));
  return {
    toGuest,
    fromGuest: () => fromGuest,
    close() {
      for (const s of servers) s.close();
      execFileSync("ip", ["link", "del", tap], { timeout: SYNC_TIMEOUT_MS });
    },
  };
}
