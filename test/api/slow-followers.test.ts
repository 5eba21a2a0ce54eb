/**
 * Event-stream followers that stop reading (issue: "Every stream the daemon serves has bounded
 * memory per client and drops or disconnects a client that does not keep up; memory returns after
 * clients leave"). A real daemon whose inventory holds a large event backlog (written into its real
 * SQLite file between two runs), and followers on raw connections that ask for all of it and then
 * read nothing: without a bound the daemon would hold the whole backlog for each of them.
 */
import { mkdtempSync, readFileSync } from "node:fs";
import { connect, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import Database from "better-sqlite3";
import { afterAll, describe, expect, it } from "vitest";
import { startDaemon, until, type TestDaemon } from "../helpers/daemon.js";

const BACKLOG = 30_000;
/** The daemon's --stream-stall-timeout here (30 s by default). */
const STALL_S = 2;
const FOLLOWERS = 12;
/** About 600 bytes on the wire per event: the backlog is ~18 MB per follower. */
const MESSAGE = "m".repeat(500);

const idsIn = (text: string): number[] => [...text.matchAll(/^id: (\d+)$/gm)].map((m) => Number(m[1]));

function rssBytes(pid: number): number {
  const kb = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1];
  return Number(kb) * 1024;
}

/** A follower that asks for the whole backlog, then does not read until told to. */
function stalledFollower(socketPath: string, after: number): { sock: Socket; received: () => Promise<string> } {
  const sock = connect(socketPath);
  sock.on("connect", () => {
    sock.write(`GET /v1/events?follow=true&after=${after} HTTP/1.1\r\nHost: x\r\n\r\n`);
    sock.pause();
  });
  sock.on("error", () => undefined);
  let got = "";
  const ended = new Promise<string>((resolve) => {
    sock.on("close", () => resolve(got));
  });
  return {
    sock,
    received: () => {
      sock.on("data", (d: Buffer) => (got += d.toString("latin1")));
      sock.resume();
      return ended;
    },
  };
}

describe("event-stream followers that do not read", () => {
  let d: TestDaemon | undefined;
  afterAll(async () => {
    await d?.stop("SIGKILL");
  });

  it("cost the daemon a bounded amount each and are cut off; one that reads gets the whole backlog; their memory goes back", async () => {
    const home = mkdtempSync(join(tmpdir(), "tvd-slow-"));
    const args = ["--stream-stall-timeout", String(STALL_S)];
    d = await startDaemon({ home, args });
    await d.stop();
    const db = new Database(join(home, "typevisor.db"));
    const add = db.prepare("INSERT INTO events (at, type, vm, message, data) VALUES (?, 'test.backlog', NULL, ?, NULL)");
    db.transaction(() => {
      for (let i = 0; i < BACKLOG; i++) add.run(new Date().toISOString(), `${i} ${MESSAGE}`);
    })();
    db.close();
    d = await startDaemon({ home, args });
    const pid = d.proc.pid!;
    const newest = (await d.client.events({ limit: 1 }))[0]!.seq;
    expect(newest).toBeGreaterThan(BACKLOG);
    const base = rssBytes(pid);

    const followers = Array.from({ length: FOLLOWERS }, () => stalledFollower(d!.socket, 0));
    await new Promise((r) => setTimeout(r, 1500));
    const t0 = performance.now();
    await d.client.health();
    const healthMs = performance.now() - t0;
    const grown = rssBytes(pid) - base;
    // Unbounded, the backlog would be ~18 MB per follower (over 200 MB for these); bounded, a
    // socket's worth each (what the kernel buffers and the response's high-water mark), plus slack.
    expect(grown, `RSS grew ${(grown / 2 ** 20).toFixed(1)} MiB`).toBeLessThan(48 * 2 ** 20);
    expect(healthMs).toBeLessThan(2000);

    // Past the stall timeout each is cut off, having been sent a gap-free prefix of the backlog.
    await new Promise((r) => setTimeout(r, STALL_S * 1000 + 1000));
    const texts = await Promise.all(followers.map((f) => f.received()));
    for (const text of texts) {
      const ids = idsIn(text);
      expect(ids.length).toBeGreaterThan(0);
      expect(ids.length).toBeLessThan(BACKLOG);
      expect(ids).toEqual(Array.from({ length: ids.length }, (_, i) => i + 1));
    }

    // A follower that reads, resuming after the first one's last id, gets everything after it in
    // order (the whole backlog, not only what fits a buffer), then the live stream.
    const from = idsIn(texts[0]!).at(-1)!;
    const reader = connect(d.socket);
    let got = "";
    reader.on("connect", () => reader.write(`GET /v1/events?follow=true&after=${from} HTTP/1.1\r\nHost: x\r\n\r\n`));
    reader.on("data", (b: Buffer) => (got += b.toString("latin1")));
    await until("the reader has the newest event", () => (got.includes(`id: ${newest}\n`) ? true : undefined), 60_000);
    const ids = idsIn(got);
    expect(ids).toEqual(Array.from({ length: newest - from }, (_, i) => from + 1 + i));
    reader.destroy();

    // Gone clients leave nothing behind: the heap comes back (what V8 keeps in RSS is its own
    // business; the heap is what a leak would grow).
    const heap = async (): Promise<number> => Number(/^typevisor_daemon_nodejs_heap_size_used_bytes (\d+)/m.exec(await d!.client.metrics())?.[1]);
    await until("the followers' memory given back", async () => ((await heap()) < 64 * 2 ** 20 ? true : undefined), 30_000);
    expect(d.proc.exitCode).toBeNull();
  }, 120_000);
});
