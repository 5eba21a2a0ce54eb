import { closeSync, mkdtempSync, rmSync, statSync, symlinkSync, writeFileSync, chownSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { openSocketNoFollow, readRegularNoFollow } from "./untrusted-file.js";

describe("files a less trusted process can replace", () => {
  const dir = mkdtempSync(join(tmpdir(), "tv-untrusted-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it("reads a regular file, refuses a symlink to one", () => {
    writeFileSync(join(dir, "log"), "line\n");
    symlinkSync(join(dir, "log"), join(dir, "link"));
    expect(readRegularNoFollow(join(dir, "log"), 100).toString()).toBe("line\n");
    expect(() => readRegularNoFollow(join(dir, "link"), 100)).toThrow(/ELOOP|symbolic/);
  });

  it("opens a socket, refuses a symlink (even to a socket) and a regular file; /proc/self/fd/N names the socket itself", async () => {
    const sock = join(dir, "s.sock");
    const server = createServer();
    await new Promise<void>((r) => server.listen(sock, r));
    try {
      symlinkSync(sock, join(dir, "to-sock"));
      symlinkSync("/etc/passwd", join(dir, "to-passwd"));
      const fd = openSocketNoFollow(sock);
      try {
        if (process.getuid?.() === 0) {
          chownSync(`/proc/self/fd/${fd}`, 4321, 4321);
          expect(statSync(sock).uid).toBe(4321);
        }
      } finally {
        closeSync(fd);
      }
      for (const bad of ["to-sock", "to-passwd"]) expect(() => openSocketNoFollow(join(dir, bad))).toThrow(/not a socket/);
      writeFileSync(join(dir, "plain"), "");
      expect(() => openSocketNoFollow(join(dir, "plain"))).toThrow(/not a socket/);
      expect(statSync("/etc/passwd").uid).toBe(0);
    } finally {
      server.close();
    }
  });
});
