/** Test helper: a stand-in for a TAP fd. */
import koffi from "koffi";

/*
 * The TAP is played by one end of an AF_UNIX datagram socketpair: like a TAP fd it is
 * non-blocking and keeps packet boundaries (one read = one packet, one writev = one packet).
 */
const c = koffi.load("libc.so.6");
const socketpairFn = c.func("int socketpair(int domain, int type, int protocol, _Out_ int *sv)");
const AF_UNIX = 1;
const SOCK_DGRAM = 2;
const SOCK_NONBLOCK = 0x800;
const SOCK_CLOEXEC = 0x80000;

/** A fake TAP: `dev` for the device, `host` for the test; both fds are pushed on `scope` for the caller to close. */
export function fakeTap(scope: number[]): { dev: number; host: number } {
  const sv = [0, 0];
  if ((socketpairFn(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) as number) !== 0) throw new Error("socketpair failed");
  scope.push(sv[0]!, sv[1]!);
  return { dev: sv[0]!, host: sv[1]! };
}
