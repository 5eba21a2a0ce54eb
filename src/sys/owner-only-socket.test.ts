import { mkdtempSync, readdirSync, rmSync, statSync } from "node:fs";
import { connect, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { listenOwnerOnly } from "./owner-only-socket.js";

describe("listenOwnerOnly", () => {
  it("makes a socket only its owner can open even under umask 000, and it answers at its path", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tv-oos-"));
    const path = join(dir, "api.sock");
    const server = createServer((c) => c.end("hi"));
    const old = process.umask(0);
    try {
      await listenOwnerOnly(server, path);
    } finally {
      process.umask(old);
    }
    try {
      expect(statSync(path).isSocket()).toBe(true);
      expect(statSync(path).mode & 0o777).toBe(0o600);
      // nothing left of the private directory it was bound in
      expect(readdirSync(dir)).toEqual(["api.sock"]);
      const got = await new Promise<string>((resolve, reject) => {
        let text = "";
        const c = connect(path);
        c.on("data", (d: Buffer) => (text += d.toString()));
        c.on("end", () => resolve(text));
        c.on("error", reject);
      });
      expect(got).toBe("hi");
      // closed, it leaves no file behind, as a plain listen() would not
      await new Promise<void>((r) => server.close(() => r()));
      expect(readdirSync(dir)).toEqual([]);
    } finally {
      server.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
