import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { once } from "node:events";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import * as libc from "./libc.js";
import {
  ECONNREFUSED,
  ENOENT,
  EPOLL_CTL_ADD,
  EPOLL_CTL_DEL,
  EPOLLOUT,
  epollCreate,
  epollCtl,
  epollReady,
  SHUT_WR,
  shutdownSocket,
  unixAccept,
  unixConnect,
  unixListen,
  unixPathProblem,
  unlinkPath,
} from "./unix-socket.js";

const dir = mkdtempSync(join(tmpdir(), "tv-unix-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** poll until readable (the test thread may block briefly). */
function readable(fd: number, ms = 1000): boolean {
  return libc.pollIn([fd], ms).length === 1;
}

describe("unix sockets through raw syscalls", () => {
  it("listen, connect, accept, read/write both ways, shutdown, EOF", () => {
    const path = join(dir, "a.sock");
    const l = unixListen(path);
    expect(existsSync(path)).toBe(true);
    expect(unixAccept(l)).toBe(-libc.EAGAIN);
    const c = unixConnect(path);
    expect(c).toBeGreaterThan(0);
    expect(readable(l)).toBe(true);
    const s = unixAccept(l);
    expect(s).toBeGreaterThan(0);
    expect(libc.writeRaw(c, Buffer.from("ping"))).toBe(4);
    const b = new Uint8Array(16);
    expect(libc.readRaw(s, b)).toBe(4);
    expect(Buffer.from(b.subarray(0, 4)).toString()).toBe("ping");
    expect(libc.readRaw(s, b)).toBe(-libc.EAGAIN);
    expect(shutdownSocket(c, SHUT_WR)).toBe(0);
    expect(libc.readRaw(s, b)).toBe(0);
    expect(libc.writeRaw(s, Buffer.from("pong"))).toBe(4);
    expect(libc.readRaw(c, b)).toBe(4);
    [s, c, l].forEach((fd) => libc.close(fd));
    expect(unlinkPath(path)).toBe(0);
    expect(unlinkPath(path)).toBe(-ENOENT);
  });

  it("connect errors come back as -errno; bad paths are refused", () => {
    expect(unixConnect(join(dir, "nothing"))).toBe(-ENOENT);
    const path = join(dir, "b.sock");
    libc.close(unixListen(path)); // the file stays, nobody listens
    expect(unixConnect(path)).toBe(-ECONNREFUSED);
    expect(() => unixListen(path)).toThrow(/bind/);
    expect(unixConnect("x".repeat(200))).toBe(-22);
    expect(unixPathProblem("")).toMatch(/empty/);
    expect(unixPathProblem("a\0b")).toMatch(/NUL/);
    expect(unixPathProblem("x".repeat(108))).toMatch(/107/);
    expect(() => unixListen("x".repeat(108))).toThrow(/107/);
  });

  it("talks to node:net peers (as host programs would)", async () => {
    const path = join(dir, "c.sock");
    const l = unixListen(path);
    const client = net.createConnection(path);
    await once(client, "connect");
    const deadline = Date.now() + 2000;
    let s = -1;
    while (s < 0 && Date.now() < deadline) {
      s = unixAccept(l);
      if (s < 0) await new Promise((r) => setTimeout(r, 5));
    }
    expect(s).toBeGreaterThan(0);
    const got = once(client, "data");
    expect(libc.writeRaw(s, Buffer.from("hello"))).toBe(5);
    expect(String((await got)[0])).toBe("hello");
    libc.close(s);
    libc.close(l);
    client.destroy();
  });

  it("an epoll fd turns readable when a full stream can take data again", () => {
    const path = join(dir, "d.sock");
    const l = unixListen(path);
    const c = unixConnect(path);
    const s = unixAccept(l);
    const chunk = new Uint8Array(65536);
    while (libc.writeRaw(c, chunk) > 0);
    const ep = epollCreate();
    expect(epollCtl(ep, EPOLL_CTL_ADD, c, EPOLLOUT)).toBe(0);
    expect(readable(ep, 0)).toBe(false);
    expect(epollReady(ep)).toEqual([]);
    const b = new Uint8Array(1 << 20);
    while (libc.readRaw(s, b) > 0);
    expect(readable(ep, 1000)).toBe(true);
    const evs = epollReady(ep);
    expect(evs).toHaveLength(1);
    expect(evs[0]!.fd).toBe(c);
    expect(evs[0]!.events & EPOLLOUT).toBe(EPOLLOUT);
    expect(epollCtl(ep, EPOLL_CTL_DEL, c, 0)).toBe(0);
    expect(readable(ep, 0)).toBe(false);
    [ep, s, c, l].forEach((fd) => libc.close(fd));
  });
});
