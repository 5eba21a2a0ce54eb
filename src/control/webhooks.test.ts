import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import type { EventRecord } from "./spec.js";
import { shownUrl, Webhooks } from "./webhooks.js";

/** A real HTTP receiver: answers each POST with the next status of `statuses` (then 200). */
async function receiver(statuses: number[]): Promise<{ url: string; got: { at: number; body: EventRecord }[]; server: Server }> {
  const got: { at: number; body: EventRecord }[] = [];
  const server = createServer((req, res) => {
    let b = "";
    req.on("data", (d: Buffer) => (b += d.toString()));
    req.on("end", () => {
      got.push({ at: Date.now(), body: JSON.parse(b) as EventRecord });
      res.statusCode = statuses.shift() ?? 200;
      res.end();
    });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/hook?token=secret`, got, server };
}

const ev = (seq: number): EventRecord => ({ seq, at: "t", type: "alert.firing", vm: "a", message: `m${seq}`, data: { rule: "r" } });

async function until<T>(f: () => T | undefined, ms = 10_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = f();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error("timed out");
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe("alert webhooks", () => {
  const servers: Server[] = [];
  afterEach(() => {
    for (const s of servers.splice(0)) s.close();
  });

  it("POSTs each event as JSON, in order, retrying failures with growing delays", async () => {
    const r = await receiver([500, 503]);
    servers.push(r.server);
    const gaveUp: string[] = [];
    const w = new Webhooks([r.url], { baseDelayMs: 100, attempts: 5, onGiveUp: (u, e, m) => gaveUp.push(`${u} ${e.seq} ${m}`) });
    w.deliver(ev(1));
    w.deliver(ev(2));
    await until(() => (r.got.length >= 4 ? true : undefined));
    expect(r.got.map((g) => g.body.seq)).toEqual([1, 1, 1, 2]);
    // backoff: 100 ms, then 200 ms
    expect(r.got[1]!.at - r.got[0]!.at).toBeGreaterThanOrEqual(90);
    expect(r.got[2]!.at - r.got[1]!.at).toBeGreaterThanOrEqual(190);
    expect(r.got[3]!.body).toEqual(ev(2));
    await until(() => (w.status()[0]!.delivered === 2 ? true : undefined));
    const s = w.status()[0]!;
    expect(s).toMatchObject({ url: shownUrl(r.url), delivered: 2, failedAttempts: 2, givenUp: 0, queued: 0, lastError: { message: "HTTP 503" } });
    expect(s.url).not.toContain("secret");
    expect(gaveUp).toEqual([]);
    w.close();
  });

  it("gives up after its attempts and says so; a receiver that is not there is a failure too", async () => {
    const r = await receiver([500, 500, 500]);
    servers.push(r.server);
    // a port nothing listens on: one just closed
    const gone = await receiver([]);
    const none = gone.url.replace(/\/hook.*/, "/none");
    await new Promise((res) => gone.server.close(res));
    const gaveUp: string[] = [];
    const w = new Webhooks([r.url, none], { baseDelayMs: 10, attempts: 3, onGiveUp: (u, e, m) => gaveUp.push(`${u} ${e.seq} ${m}`) });
    w.deliver(ev(7));
    await until(() => (gaveUp.length === 2 ? true : undefined));
    expect(gaveUp.sort()).toEqual([`${shownUrl(r.url)} 7 HTTP 500`, `${none} 7 connect ECONNREFUSED ${none.replace(/^http:\/\/(.*)\/none$/, "$1")}`].sort());
    expect(w.status().map((s) => [s.givenUp, s.failedAttempts, s.delivered])).toEqual([
      [1, 3, 0],
      [1, 3, 0],
    ]);
    // the next event goes through
    w.deliver(ev(8));
    await until(() => (r.got.some((g) => g.body.seq === 8) ? true : undefined));
    w.close();
  });
});
