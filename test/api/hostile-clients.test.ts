/**
 * Clients that misbehave on purpose, against a real daemon: nothing they send or do at any stage
 * may make it exit (issue: "a single HTTP request can make the daemon exit").
 */
import { chmodSync, mkdtempSync, statSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startDaemon, type TestDaemon } from "../helpers/daemon.js";

/** Send raw bytes on a fresh connection; resolve with what came back until the peer closed (or `waitMs`). */
function rawExchange(socketPath: string, bytes: string, opts: { closeAfterWrite?: boolean; waitMs?: number } = {}): Promise<string> {
  return new Promise((resolve) => {
    const s = connect(socketPath);
    let got = "";
    const done = (): void => {
      clearTimeout(t);
      s.destroy();
      resolve(got);
    };
    const t = setTimeout(done, opts.waitMs ?? 2000);
    s.on("data", (d: Buffer) => (got += d.toString("latin1")));
    s.on("error", done);
    s.on("close", done);
    s.on("connect", () => {
      s.write(bytes);
      if (opts.closeAfterWrite === true) done();
    });
  });
}

const upgrade = (path: string): string => `GET ${path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n`;

describe("hostile clients against a real daemon", () => {
  let d: TestDaemon;
  beforeAll(async () => {
    d = await startDaemon();
  });
  afterAll(async () => {
    await d.stop();
  });

  it("a malformed percent-encoding on the console-attach route is a 400, and the daemon lives", async () => {
    const answer = await rawExchange(d.socket, upgrade("/v1/vms/%E0%A4%A/console/attach"));
    expect(answer).toMatch(/^HTTP\/1\.1 400 /);
    expect(answer).toContain("application/problem+json");
    expect(await d.client.health()).toBeTruthy();
  });

  it("clients that hang up at once on a refused upgrade, many times over, leave the daemon serving", async () => {
    for (let i = 0; i < 50; i++) {
      await rawExchange(d.socket, upgrade(i % 2 === 0 ? "/v1/vms/nosuchvm/console/attach" : "/nowhere"), { closeAfterWrite: true });
    }
    expect(d.proc.exitCode).toBeNull();
    expect(await d.client.health()).toBeTruthy();
  });
});

describe("the data directory", () => {
  it("is made owner-only at start even when it existed with loose permissions", async () => {
    const home = mkdtempSync(join(tmpdir(), "tvd-loose-"));
    chmodSync(home, 0o755);
    const d = await startDaemon({ home });
    try {
      expect(statSync(home).mode & 0o777).toBe(0o700);
      expect(statSync(d.socket).mode & 0o077).toBe(0);
    } finally {
      await d.stop();
    }
  });
});
