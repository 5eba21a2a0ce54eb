import { createSocket } from "node:dgram";
import { createServer, type Server, type Socket } from "node:net";
import type { AddressInfo } from "node:net";
import { describe, expect, it } from "vitest";
import { thrown } from "../../test/helpers/thrown.js";
import { formatSyslog, MAX_UDP_MESSAGE, parseSyslogTarget, SyslogForwarder } from "./syslog.js";

const line = (o: Record<string, unknown>): string => JSON.stringify({ level: 30, time: Date.parse("2026-12-05T01:02:03.456Z"), pid: 42, msg: "hello", ...o });

/** RFC 5424 §6: HEADER SP STRUCTURED-DATA [SP MSG]. */
const RFC5424 = /^<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) (-|\[.*\])(?: (.*))?$/s;

describe("syslog (RFC 5424)", () => {
  it("formats a daemon log line: facility daemon, the level's severity, the VM and event as structured data", () => {
    const m = RFC5424.exec(formatSyslog(line({ level: 50, vm: "web", event: "vm.crashed", msg: "VM web crashed", err: "SIGKILL" }), "host1")!)!;
    expect(m.slice(1)).toEqual(["27", "2026-12-05T01:02:03.456Z", "host1", "typevisor", "42", "vm.crashed", '[typevisor@32473 vm="web" event="vm.crashed"]', "VM web crashed: SIGKILL"]);
    // info is 30 (3*8+6), warn 28, debug 31, fatal 26
    expect([30, 40, 20, 60].map((level) => RFC5424.exec(formatSyslog(line({ level }), "h")!)![1])).toEqual(["30", "28", "31", "26"]);
    expect(formatSyslog(line({}), "h")).toBe("<30>1 2026-12-05T01:02:03.456Z h typevisor 42 - - hello");
  });

  it("escapes what the structured data and the header may not hold, and keeps a message on one line", () => {
    const m = formatSyslog(line({ vm: 'a"b]c\\d', msg: "two\nlines\r\n" }), "bad host\u00e9")!;
    expect(m).toContain('[typevisor@32473 vm="a\\"b\\]c\\\\d"]');
    expect(m).toContain(" badhost typevisor ");
    expect(m).not.toMatch(/[\r\n]/);
    expect(formatSyslog("not json")).toBeUndefined();
    expect(formatSyslog("[1]")).toBeUndefined();
  });

  it("takes udp:// and tcp:// targets only", () => {
    expect(parseSyslogTarget("udp://logs.example")).toEqual({ protocol: "udp", host: "logs.example", port: 514 });
    expect(parseSyslogTarget("tcp://[::1]:6514")).toEqual({ protocol: "tcp", host: "::1", port: 6514 });
    for (const bad of ["http://x", "udp://", "udp://x:0", "udp://x:70000", "tcp://a b", "x"]) expect(thrown(() => parseSyslogTarget(bad)).code).toBe("INVALID_ARGUMENT");
  });

  it("sends one datagram per line over UDP, cut to 2048 bytes on a character boundary", async () => {
    const rx = createSocket("udp4");
    await new Promise<void>((r) => rx.bind(0, "127.0.0.1", r));
    const got: Buffer[] = [];
    rx.on("message", (b) => got.push(b));
    const f = new SyslogForwarder({ protocol: "udp", host: "127.0.0.1", port: (rx.address() as AddressInfo).port }, "h");
    f.write(line({ msg: "one" }));
    f.write(line({ msg: "é".repeat(3000) }));
    await until(() => got.length === 2);
    expect(got[0]!.toString()).toMatch(/ one$/);
    expect(got[1]!.length).toBeLessThanOrEqual(MAX_UDP_MESSAGE);
    expect(got[1]!.toString("utf8")).not.toContain("\ufffd");
    f.close();
    rx.close();
  });

  it("frames messages by octet counting over TCP, queues while the receiver is away and delivers in order when it is back", async () => {
    const frames: string[] = [];
    let buf = Buffer.alloc(0);
    const onData = (d: Buffer): void => {
      buf = Buffer.concat([buf, d]);
      for (;;) {
        const sp = buf.indexOf(0x20);
        if (sp < 0) return;
        const len = Number(buf.subarray(0, sp).toString());
        if (buf.length < sp + 1 + len) return;
        frames.push(buf.subarray(sp + 1, sp + 1 + len).toString());
        buf = buf.subarray(sp + 1 + len);
      }
    };
    const conns: Socket[] = [];
    const listen = (port = 0): Promise<Server> =>
      new Promise((resolve) => {
        const srv = createServer((c) => {
          conns.push(c);
          c.on("data", onData);
        });
        srv.listen(port, "127.0.0.1", () => resolve(srv));
      });
    let srv = await listen();
    const port = (srv.address() as AddressInfo).port;
    const f = new SyslogForwarder({ protocol: "tcp", host: "127.0.0.1", port }, "h");
    f.write(line({ msg: "first" }));
    await until(() => frames.length === 1);
    // the receiver goes away: lines queue, and reach it, in order, once it is back
    for (const c of conns) c.destroy();
    await new Promise<void>((r) => srv.close(() => r()));
    await until(() => !f.up);
    f.write(line({ msg: "second" }));
    f.write(line({ msg: "third with a space" }));
    srv = await listen(port);
    await until(() => frames.length === 3, 10_000);
    expect(frames.map((m) => RFC5424.exec(m)![8])).toEqual(["first", "second", "third with a space"]);
    f.close();
    for (const c of conns) c.destroy();
    srv.close();
  });
});

async function until(ok: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > end) throw new Error("timed out");
    await new Promise((r) => setTimeout(r, 20));
  }
}
