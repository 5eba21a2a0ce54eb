/** Test helper: a stand-in for a TAP fd. */
import { datagramPair } from "../../../../sys/libc.js";

/**
 * A fake TAP: `dev` for the device, `host` for the test; both fds are pushed on `scope` for the
 * caller to close. One end each of a non-blocking AF_UNIX datagram pair (libc.datagramPair): like
 * a TAP fd it keeps packet boundaries (one read = one packet, one writev = one packet).
 */
export function fakeTap(scope: number[]): { dev: number; host: number } {
  const [dev, host] = datagramPair();
  scope.push(dev, host);
  return { dev, host };
}
