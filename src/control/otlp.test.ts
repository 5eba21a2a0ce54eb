import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { thrown } from "../../test/helpers/thrown.js";
import { logRecord, OtlpForwarder, parseOtlpUrl, type LogRecord } from "./otlp.js";

const line = (o: Record<string, unknown>): string => JSON.stringify({ level: 30, time: 1_764_896_523_456, pid: 42, msg: "hello", ...o });

interface Export {
  resourceLogs: { resource: { attributes: { key: string; value: Record<string, unknown> }[] }; scopeLogs: { scope: { name: string }; logRecords: LogRecord[] }[] }[];
}

let server: Server | undefined;
afterEach(() => {
  server?.close();
  server = undefined;
});

/** A collector: answers each POST with the next status of `statuses` (then 200), keeps the bodies. */
async function collector(statuses: number[]): Promise<{ url: string; posts: { type: string | undefined; body: Export }[] }> {
  const posts: { type: string | undefined; body: Export }[] = [];
  server = createServer((req, res) => {
    let b = "";
    req.on("data", (d: Buffer) => (b += d.toString()));
    req.on("end", () => {
      posts.push({ type: req.headers["content-type"], body: JSON.parse(b) as Export });
      res.statusCode = statuses.shift() ?? 200;
      res.end("{}");
    });
  });
  await new Promise<void>((r) => server!.listen(0, "127.0.0.1", r));
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/v1/logs`, posts };
}

async function until(ok: () => boolean, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > end) throw new Error("timed out");
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe("OTLP/HTTP logs", () => {
  it("maps a daemon log line to a LogRecord: nanosecond time as a string, severity, body, fields as attributes", () => {
    const r = logRecord(line({ level: 50, vm: "web", event: "vm.crashed", restarts: 2, ok: false, ratio: 0.5, nested: { x: 1 } }), 1_764_896_524_000)!;
    expect(r).toEqual({
      timeUnixNano: "1764896523456000000",
      observedTimeUnixNano: "1764896524000000000",
      severityNumber: 17,
      severityText: "ERROR",
      body: { stringValue: "hello" },
      attributes: [
        { key: "vm", value: { stringValue: "web" } },
        { key: "event", value: { stringValue: "vm.crashed" } },
        { key: "restarts", value: { intValue: "2" } },
        { key: "ok", value: { boolValue: false } },
        { key: "ratio", value: { doubleValue: 0.5 } },
      ],
    });
    expect([10, 20, 30, 40, 60].map((level) => logRecord(line({ level }))!.severityNumber)).toEqual([1, 5, 9, 13, 21]);
    expect(logRecord("garbage")).toBeUndefined();
    expect(thrown(() => parseOtlpUrl("udp://x")).code).toBe("INVALID_ARGUMENT");
  });

  it("POSTs batches as an ExportLogsServiceRequest, retries a batch the collector refuses, and sends what is left at close", async () => {
    const c = await collector([503]);
    const f = new OtlpForwarder(c.url, { intervalMs: 50, baseDelayMs: 20 });
    f.write(line({ msg: "one" }));
    f.write(line({ msg: "two", vm: "web" }));
    await until(() => f.status.sent === 2);
    expect(c.posts).toHaveLength(2); // the refused one, then the same batch again
    expect(c.posts[1]!.type).toBe("application/json");
    const rl = c.posts[1]!.body.resourceLogs[0]!;
    expect(rl.resource.attributes.find((a) => a.key === "service.name")!.value).toEqual({ stringValue: "typevisor" });
    expect(rl.scopeLogs[0]!.logRecords.map((r) => r.body.stringValue)).toEqual(["one", "two"]);
    expect(f.status).toMatchObject({ sent: 2, dropped: 0, failedAttempts: 1, lastError: "HTTP 503" });
    f.write(line({ msg: "last" }));
    await f.close();
    expect(c.posts.at(-1)!.body.resourceLogs[0]!.scopeLogs[0]!.logRecords.map((r) => r.body.stringValue)).toEqual(["last"]);
  });

  it("drops a batch after five refusals, counted, and goes on with the next", async () => {
    const c = await collector([500, 500, 500, 500, 500]);
    const f = new OtlpForwarder(c.url, { intervalMs: 20, baseDelayMs: 5 });
    f.write(line({ msg: "lost" }));
    await until(() => f.status.dropped === 1);
    f.write(line({ msg: "kept" }));
    await until(() => f.status.sent === 1);
    expect(c.posts.at(-1)!.body.resourceLogs[0]!.scopeLogs[0]!.logRecords.map((r) => r.body.stringValue)).toEqual(["kept"]);
    await f.close();
  });
});
