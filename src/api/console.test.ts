import { appendFileSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Writable } from "node:stream";
import { describe, expect, it } from "vitest";
import { FOLLOW_HIGH_WATER, followConsole } from "./console.js";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A client connection that takes nothing until `release()`, then everything. */
class StalledClient extends Writable {
  received: Buffer[] = [];
  private held: (() => void)[] = [];
  private flowing = false;
  override _write(chunk: Buffer, _enc: BufferEncoding, cb: () => void): void {
    this.received.push(chunk);
    if (this.flowing) cb();
    else this.held.push(cb);
  }
  release(): void {
    this.flowing = true;
    for (const cb of this.held.splice(0)) cb();
  }
}

describe("following a console log", () => {
  it("holds at most FOLLOW_HIGH_WATER for a client that does not read, and catches up in order when it does", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tv-follow-"));
    const log = join(dir, "console.log");
    writeFileSync(log, "");
    const client = new StalledClient({ highWaterMark: 16 * 1024 });
    const stop = followConsole(log, client, 10);
    try {
      // the guest prints 4 MiB while the client reads nothing
      let written = 0;
      for (let i = 0; i < 64; i++) {
        const chunk = Buffer.alloc(65536, 0x41 + (i % 26));
        appendFileSync(log, chunk);
        written += chunk.length;
        await sleep(5);
        expect(client.writableLength).toBeLessThanOrEqual(FOLLOW_HIGH_WATER + 65536);
      }
      await sleep(100);
      expect(client.writableLength).toBeLessThanOrEqual(FOLLOW_HIGH_WATER + 65536);
      client.release();
      for (let i = 0; i < 200 && Buffer.concat(client.received).length < written; i++) await sleep(20);
      const got = Buffer.concat(client.received);
      expect(got.length).toBe(written);
      for (let i = 0; i < 64; i++) expect(got[i * 65536]).toBe(0x41 + (i % 26));
    } finally {
      stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
