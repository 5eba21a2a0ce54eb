import { once } from "node:events";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { afterAll, afterEach, describe, expect, it } from "vitest";
import * as libc from "../../../../sys/libc.js";
import { GuestMemory } from "../../../memory/guest-memory.js";
import type { ActivateContext } from "../device.js";
import { hasFeature, VIRTIO_F, VIRTIO_ID } from "../device.js";
import { QueueDriver } from "../queue/driver.js";
import type { VsockHeader } from "./packet.js";
import { decodeHeader, encodeHeader, VSOCK_HDR_LEN, VSOCK_OP, VSOCK_SHUTDOWN_RCV, VSOCK_SHUTDOWN_SEND, VSOCK_TYPE_STREAM } from "./packet.js";
import { VSOCK_BUF_ALLOC, VSOCK_CONFIG_SIZE, VSOCK_MAX_PAYLOAD, VSOCK_EVQ, VSOCK_RXQ, VSOCK_TXQ, VsockDevice } from "./vsock.js";

const dir = mkdtempSync(join(tmpdir(), "tv-vsock-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let seq = 0;
const cleanups: (() => void)[] = [];
afterEach(() => {
  cleanups.splice(0).forEach((f) => f());
});

const CID = 3;
const QS = 64;
/** Guest layout: three queues, then rx buffer slots by head, then tx slots by head. */
const RX_BASE = 0;
const TX_BASE = 0x2000;
const EV_BASE = 0x4000;
const RX_DATA = 0x10000;
const RX_SLOT = 0x1100;
const TX_DATA = RX_DATA + QS * RX_SLOT;
const TX_SLOT = 0x10100;
const MEM = TX_DATA + QS * TX_SLOT;

interface Pkt extends VsockHeader {
  payload: Buffer;
}

class Rig {
  readonly dev: VsockDevice;
  readonly udsPath: string;
  readonly mem = new GuestMemory(new ArrayBuffer(MEM), [{ guestPhysAddr: 0, size: MEM, hostOffset: 0 }]);
  readonly rx = new QueueDriver(this.mem, QS, RX_BASE);
  readonly tx = new QueueDriver(this.mem, QS, TX_BASE);
  readonly ev = new QueueDriver(this.mem, QS, EV_BASE);
  readonly resets: string[] = [];
  readonly received: Pkt[] = [];
  readonly rxLen = new Map<number, number>();
  readonly ctx: ActivateContext;

  constructor(opts: { maxConnections?: number } = {}) {
    this.udsPath = join(dir, `v${seq++}.sock`);
    this.dev = new VsockDevice({ guestCid: CID, udsPath: this.udsPath, ...opts });
    cleanups.push(() => this.dev.close());
    this.ctx = {
      mem: this.mem,
      queues: [this.rx.config, this.tx.config, this.ev.config],
      features: this.dev.features,
      interruptQueue: () => undefined,
      interruptConfig: () => undefined,
      needsReset: (r) => this.resets.push(r),
    };
    this.dev.activate(this.ctx);
  }

  /** Post `n` rx chains of `len` bytes (one descriptor each, at the slot of their head). */
  postRx(n: number, len = 44 + 4096): void {
    for (let i = 0; i < n; i++) {
      const head = this.rx.addChain([{ addr: 0, len: 0 }]);
      this.rx.writeDesc(this.rx.config.descAddr, head, RX_DATA + head * RX_SLOT, len, 2, 0);
      this.rxLen.set(head, len);
      this.rx.publish(head);
    }
    this.dev.notify(VSOCK_RXQ);
  }

  /** Packets the device completed since the last call, parsed. */
  collect(): Pkt[] {
    const out: Pkt[] = [];
    for (const u of this.rx.takeUsed()) {
      expect(u.len).toBeLessThanOrEqual(this.rxLen.get(u.id)!);
      const addr = RX_DATA + u.id * RX_SLOT;
      const h = decodeHeader(this.mem.read(addr, VSOCK_HDR_LEN));
      expect(u.len).toBe(VSOCK_HDR_LEN + h.len);
      out.push({ ...h, payload: Buffer.from(this.mem.read(addr + VSOCK_HDR_LEN, h.len)) });
    }
    this.received.push(...out);
    return out;
  }

  /** Guest sends one packet (header and payload in one descriptor, or two when `split`). */
  send(h: Partial<VsockHeader>, payload: Uint8Array = new Uint8Array(0), split = false): void {
    const full: VsockHeader = { srcCid: BigInt(CID), dstCid: 2n, srcPort: 0, dstPort: 0, len: payload.length, type: VSOCK_TYPE_STREAM, op: VSOCK_OP.RW, flags: 0, bufAlloc: VSOCK_BUF_ALLOC, fwdCnt: 0, ...h };
    const head = this.tx.addChain(split ? [{ addr: 0, len: 0 }, { addr: 0, len: 0 }] : [{ addr: 0, len: 0 }]);
    const addr = TX_DATA + head * TX_SLOT;
    const b = new Uint8Array(VSOCK_HDR_LEN + payload.length);
    encodeHeader(full, b);
    b.set(payload, VSOCK_HDR_LEN);
    this.mem.write(addr, b);
    if (split) {
      this.tx.writeDesc(this.tx.config.descAddr, head, addr, VSOCK_HDR_LEN, 1, (head + 1) % QS);
      this.tx.writeDesc(this.tx.config.descAddr, (head + 1) % QS, addr + VSOCK_HDR_LEN, payload.length, 0, 0);
    } else {
      this.tx.writeDesc(this.tx.config.descAddr, head, addr, b.length, 0, 0);
    }
    this.tx.publish(head);
    this.dev.notify(VSOCK_TXQ);
  }

  /** One pass of the device thread: poll the wanted back-end fds without blocking. */
  pump(): void {
    const fds = this.dev.backendFds.filter((fd) => this.dev.backendWanted(fd));
    for (const i of libc.pollIn(fds, 0)) this.dev.onBackendReadable(fds[i]!);
    this.collect();
  }

  async until(cond: () => boolean, what: string, ms = 3000): Promise<void> {
    const deadline = Date.now() + ms;
    for (;;) {
      this.pump();
      if (cond()) return;
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
      await new Promise((r) => setTimeout(r, 2));
    }
  }

  /** The payload bytes of RW packets received so far on (localPort -> peerPort). */
  dataFrom(src: number, dst: number): Buffer {
    return Buffer.concat(this.received.filter((p) => p.op === VSOCK_OP.RW && p.srcPort === src && p.dstPort === dst).map((p) => p.payload));
  }
}

function sink(sock: net.Socket): { data: () => Buffer } {
  const parts: Buffer[] = [];
  sock.on("data", (d: Buffer) => parts.push(d));
  return { data: () => Buffer.concat(parts) };
}

async function listenAt(path: string): Promise<{ server: net.Server; conns: net.Socket[] }> {
  const conns: net.Socket[] = [];
  const server = net.createServer((s) => conns.push(s));
  server.listen(path);
  await once(server, "listening");
  cleanups.push(() => {
    conns.forEach((c) => c.destroy());
    server.close();
  });
  return { server, conns };
}

function pattern(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 13 + seed) & 0xff;
  return b;
}

describe("VsockDevice identity", () => {
  it("is type 19 with rx/tx/event queues, VERSION_1 + EVENT_IDX + INDIRECT, guest_cid in config", () => {
    const r = new Rig();
    expect(r.dev.deviceType).toBe(VIRTIO_ID.VSOCK);
    expect(r.dev.queueMaxSizes).toHaveLength(3);
    for (const b of [VIRTIO_F.VERSION_1, VIRTIO_F.EVENT_IDX, VIRTIO_F.INDIRECT_DESC]) expect(hasFeature(r.dev.features, b)).toBe(true);
    expect(r.dev.configSize).toBe(VSOCK_CONFIG_SIZE);
    expect(r.dev.readConfig(0, 8)).toBe(3n);
    expect(r.dev.readConfig(0, 4)).toBe(3n);
    expect(r.dev.readConfig(4, 4)).toBe(0n);
    expect(r.dev.readConfig(8, 1)).toBe(0n);
    r.dev.writeConfig(0, 8, 99n);
    expect(r.dev.readConfig(0, 8)).toBe(3n);
    const big = new VsockDevice({ guestCid: 0xfffffffe, udsPath: join(dir, "big.sock") });
    expect(big.readConfig(0, 8)).toBe(0xfffffffen);
    expect(big.readConfig(2, 2)).toBe(0xffffn);
    big.close();
  });

  it("refuses reserved CIDs and bad paths; replaces a stale socket file, refuses a live one; close() unlinks", () => {
    for (const cid of [0, 1, 2, -1, 1.5, 0xffffffff, 2 ** 40]) expect(() => new VsockDevice({ guestCid: cid, udsPath: join(dir, "x.sock") })).toThrow(/reserved/);
    expect(() => new VsockDevice({ guestCid: 3, udsPath: "" })).toThrow(/empty/);
    expect(() => new VsockDevice({ guestCid: 3, udsPath: `/tmp/${"x".repeat(92)}` })).toThrow(/too long/);
    const file = join(dir, "plain");
    writeFileSync(file, "x");
    expect(() => new VsockDevice({ guestCid: 3, udsPath: file })).toThrow(/not a socket/);
    const path = join(dir, "stale.sock");
    const a = new VsockDevice({ guestCid: 3, udsPath: path });
    expect(() => new VsockDevice({ guestCid: 4, udsPath: path })).toThrow(/in use/);
    libc.close(a.listenFd); // simulate a VMM that died: the file stays, nobody listens
    const b = new VsockDevice({ guestCid: 4, udsPath: path });
    expect(existsSync(path)).toBe(true);
    b.close();
    expect(existsSync(path)).toBe(false);
    b.close();
  });
});

describe("VsockDevice host-initiated connections (CONNECT <port>)", () => {
  it("CONNECT -> REQUEST, RESPONSE -> OK <port>, data both ways, half-close and teardown", async () => {
    const r = new Rig();
    r.postRx(16);
    const client = net.createConnection(r.udsPath);
    const got = sink(client);
    await once(client, "connect");
    client.write("CONNECT 52\n");
    await r.until(() => r.received.length > 0, "REQUEST");
    const req = r.received[0]!;
    expect(req).toMatchObject({ srcCid: 2n, dstCid: 3n, dstPort: 52, op: VSOCK_OP.REQUEST, type: VSOCK_TYPE_STREAM, len: 0, bufAlloc: VSOCK_BUF_ALLOC });
    const hp = req.srcPort;
    expect(hp).toBeGreaterThanOrEqual(1024);

    r.send({ srcPort: 52, dstPort: hp, op: VSOCK_OP.RESPONSE, bufAlloc: 65536 });
    await r.until(() => got.data().includes("\n"), "OK line");
    expect(got.data().toString()).toBe(`OK ${hp}\n`);

    const up = pattern(10000, 1);
    client.write(up);
    await r.until(() => r.dataFrom(hp, 52).length >= up.length, "host data in the guest");
    expect(r.dataFrom(hp, 52).equals(up)).toBe(true);
    // Each packet fits the 4 KiB rx buffers.
    expect(r.received.every((p) => p.len <= 4096)).toBe(true);

    const down = pattern(30000, 2);
    r.send({ srcPort: 52, dstPort: hp, op: VSOCK_OP.RW, fwdCnt: up.length }, down.subarray(0, 20000));
    r.send({ srcPort: 52, dstPort: hp, op: VSOCK_OP.RW, fwdCnt: up.length }, down.subarray(20000), true);
    await r.until(() => got.data().length >= `OK ${hp}\n`.length + down.length, "guest data at the host");
    expect(got.data().subarray(`OK ${hp}\n`.length).equals(down)).toBe(true);

    // The host half-closes: the guest hears SHUTDOWN(SEND); its own SHUTDOWN ends the connection.
    client.end();
    await r.until(() => r.received.some((p) => p.op === VSOCK_OP.SHUTDOWN), "SHUTDOWN");
    expect(r.received.find((p) => p.op === VSOCK_OP.SHUTDOWN)).toMatchObject({ srcPort: hp, dstPort: 52, flags: VSOCK_SHUTDOWN_SEND });
    const closed = once(client, "close");
    r.send({ srcPort: 52, dstPort: hp, op: VSOCK_OP.SHUTDOWN, flags: VSOCK_SHUTDOWN_RCV | VSOCK_SHUTDOWN_SEND });
    r.pump();
    expect(r.received.at(-1)).toMatchObject({ op: VSOCK_OP.RST, srcPort: hp, dstPort: 52 });
    await closed;
    expect(r.dev.stats().open).toBe(0);
    expect(r.resets).toEqual([]);
  });

  it("a guest RST closes the host stream; bad CONNECT lines are closed; distinct local ports", async () => {
    const r = new Rig();
    r.postRx(16);
    const a = net.createConnection(r.udsPath);
    const b = net.createConnection(r.udsPath);
    const bad = net.createConnection(r.udsPath);
    await Promise.all([once(a, "connect"), once(b, "connect"), once(bad, "connect")]);
    a.write("CONNECT 7\n");
    b.write("CONNECT 7\n");
    bad.write("CONNECT seven\n");
    const badClosed = once(bad, "close");
    await r.until(() => r.received.length >= 2, "two REQUESTs");
    await badClosed;
    const [p1, p2] = r.received.map((p) => p.srcPort);
    expect(p1).not.toBe(p2);
    const aClosed = once(a, "close");
    r.send({ srcPort: 7, dstPort: p1!, op: VSOCK_OP.RST });
    await aClosed;
    expect(r.dev.stats().open).toBe(1);
    r.dev.reset();
    expect(r.dev.stats().open).toBe(0);
    b.destroy();
  });
});

describe("VsockDevice guest-initiated connections (uds_path_<port>)", () => {
  it("REQUEST to a listening port -> RESPONSE, data both ways; RST closes the host side", async () => {
    const r = new Rig();
    r.postRx(16);
    const { conns } = await listenAt(`${r.udsPath}_1234`);
    r.send({ srcPort: 5000, dstPort: 1234, op: VSOCK_OP.REQUEST, bufAlloc: 65536 });
    expect(r.collect()).toMatchObject([{ op: VSOCK_OP.RESPONSE, srcCid: 2n, dstCid: 3n, srcPort: 1234, dstPort: 5000, bufAlloc: VSOCK_BUF_ALLOC, fwdCnt: 0 }]);
    await r.until(() => conns.length === 1, "accept on the host");
    const srv = conns[0]!;
    const got = sink(srv);
    srv.write("ping");
    await r.until(() => r.dataFrom(1234, 5000).length === 4, "ping in the guest");
    expect(r.dataFrom(1234, 5000).toString()).toBe("ping");
    r.send({ srcPort: 5000, dstPort: 1234, op: VSOCK_OP.RW }, Buffer.from("pong"));
    await r.until(() => got.data().length === 4, "pong on the host");
    expect(got.data().toString()).toBe("pong");
    const ended = once(srv, "end");
    r.send({ srcPort: 5000, dstPort: 1234, op: VSOCK_OP.RST });
    await r.until(() => srv.readableEnded, "host sees EOF");
    await ended;
    expect(r.dev.stats()).toMatchObject({ open: 0, guestConnections: 1 });
  });

  it("RST for a port nobody listens on, for data on unknown connections; never RST an RST", () => {
    const r = new Rig();
    r.postRx(16);
    r.send({ srcPort: 5000, dstPort: 9, op: VSOCK_OP.REQUEST });
    r.send({ srcPort: 5001, dstPort: 10, op: VSOCK_OP.RW }, Buffer.from("x"));
    r.send({ srcPort: 5002, dstPort: 11, op: VSOCK_OP.RST });
    r.send({ srcPort: 5003, dstPort: 12, op: VSOCK_OP.REQUEST, type: 2 }); // SEQPACKET: not offered
    r.send({ srcPort: 5004, dstPort: 13, op: VSOCK_OP.REQUEST, srcCid: 4n }); // spoofed: dropped
    r.send({ srcPort: 5005, dstPort: 14, op: VSOCK_OP.REQUEST, dstCid: 1n }); // not for the host: dropped
    expect(r.collect().map((p) => [p.op, p.srcPort, p.dstPort])).toEqual([
      [VSOCK_OP.RST, 9, 5000],
      [VSOCK_OP.RST, 10, 5001],
      [VSOCK_OP.RST, 12, 5003],
    ]);
    expect(r.dev.stats().guestRefused).toBe(1);
  });

  it("replies wait for rx buffers and keep their order", () => {
    const r = new Rig();
    r.send({ srcPort: 1, dstPort: 9, op: VSOCK_OP.REQUEST });
    r.send({ srcPort: 2, dstPort: 9, op: VSOCK_OP.REQUEST });
    expect(r.collect()).toEqual([]);
    r.postRx(1);
    expect(r.collect().map((p) => p.dstPort)).toEqual([1]);
    r.postRx(4);
    expect(r.collect().map((p) => p.dstPort)).toEqual([2]);
  });
});

describe("VsockDevice flow control (virtio 1.2 §5.10.6.3)", () => {
  it("never sends more than the guest's credit, resumes on CREDIT_UPDATE, packets fit rx buffers", async () => {
    const r = new Rig();
    r.postRx(32, 44 + 300);
    const { conns } = await listenAt(`${r.udsPath}_80`);
    r.send({ srcPort: 6000, dstPort: 80, op: VSOCK_OP.REQUEST, bufAlloc: 1000 });
    await r.until(() => conns.length === 1, "accept");
    const data = pattern(5000, 3);
    conns[0]!.write(data);
    await r.until(() => r.dataFrom(80, 6000).length >= 1000, "first 1000 bytes");
    for (let i = 0; i < 20; i++) {
      r.pump();
      await new Promise((res) => setTimeout(res, 1));
    }
    expect(r.dataFrom(80, 6000).length).toBe(1000);
    expect(r.received.filter((p) => p.op === VSOCK_OP.RW).every((p) => p.len <= 300)).toBe(true);
    const fd = r.dev.backendFds.at(-1)!;
    expect(r.dev.backendWanted(fd)).toBe(false); // no credit: not polled (poll would spin)
    r.send({ srcPort: 6000, dstPort: 80, op: VSOCK_OP.CREDIT_UPDATE, bufAlloc: 1000, fwdCnt: 1000 });
    expect(r.dev.backendWanted(fd)).toBe(true);
    await r.until(() => r.dataFrom(80, 6000).length >= 2000, "second 1000 bytes");
    r.send({ srcPort: 6000, dstPort: 80, op: VSOCK_OP.CREDIT_UPDATE, bufAlloc: 1_000_000, fwdCnt: 2000 });
    await r.until(() => r.dataFrom(80, 6000).length >= 5000, "the rest");
    expect(r.dataFrom(80, 6000).equals(data)).toBe(true);
    // A CREDIT_REQUEST is answered with our state.
    r.send({ srcPort: 6000, dstPort: 80, op: VSOCK_OP.CREDIT_REQUEST, bufAlloc: 1_000_000, fwdCnt: 5000 });
    expect(r.collect()).toMatchObject([{ op: VSOCK_OP.CREDIT_UPDATE, srcPort: 80, dstPort: 6000, bufAlloc: VSOCK_BUF_ALLOC, fwdCnt: 0 }]);
  });

  it("buffers what a slow host stream will not take, flushes it through the epoll, and updates credit", async () => {
    const r = new Rig();
    r.postRx(32);
    const { conns } = await listenAt(`${r.udsPath}_81`);
    r.send({ srcPort: 6001, dstPort: 81, op: VSOCK_OP.REQUEST });
    await r.until(() => conns.length === 1, "accept");
    const srv = conns[0]!;
    srv.pause();
    // A well-behaved guest sends exactly our credit; the paused host cannot take it all.
    const data = pattern(VSOCK_BUF_ALLOC + 128 * 1024, 4);
    for (let off = 0; off < VSOCK_BUF_ALLOC; off += 65536) r.send({ srcPort: 6001, dstPort: 81, op: VSOCK_OP.RW }, data.subarray(off, off + 65536));
    r.pump();
    expect(r.dev.backendWanted(r.dev.epollFd)).toBe(true); // some of it waits for writability
    expect(r.received.some((p) => p.op === VSOCK_OP.RST)).toBe(false);
    const got = sink(srv);
    srv.resume();
    await r.until(() => got.data().length >= VSOCK_BUF_ALLOC, "the first 256 KiB at the host");
    r.pump();
    expect(r.dev.backendWanted(r.dev.epollFd)).toBe(false);
    // Every packet to the guest carries our fwd_cnt; the guest must be left at least a packet of credit.
    const fwd = (): number => Math.max(0, ...r.received.map((p) => p.fwdCnt));
    expect(fwd()).toBeGreaterThanOrEqual(VSOCK_MAX_PAYLOAD); // its view of our free space after sending 256 KiB
    let sent = VSOCK_BUF_ALLOC;
    while (sent < data.length) {
      const credit = VSOCK_BUF_ALLOC - (sent - fwd());
      if (credit <= 0) {
        await r.until(() => VSOCK_BUF_ALLOC - (sent - fwd()) > 0, "credit");
        continue;
      }
      const n = Math.min(65536, credit, data.length - sent);
      r.send({ srcPort: 6001, dstPort: 81, op: VSOCK_OP.RW }, data.subarray(sent, sent + n));
      sent += n;
    }
    await r.until(() => got.data().length >= data.length, "all data at the host");
    expect(got.data().equals(data)).toBe(true);
    expect(r.received.some((p) => p.op === VSOCK_OP.RST)).toBe(false);
  });

  it("resets a guest that sends beyond our credit", async () => {
    const r = new Rig();
    r.postRx(32);
    const { conns } = await listenAt(`${r.udsPath}_82`);
    r.send({ srcPort: 6002, dstPort: 82, op: VSOCK_OP.REQUEST });
    await r.until(() => conns.length === 1, "accept");
    conns[0]!.pause();
    const chunk = pattern(65536, 5);
    for (let i = 0; i < 40 && !r.received.some((p) => p.op === VSOCK_OP.RST); i++) {
      r.send({ srcPort: 6002, dstPort: 82, op: VSOCK_OP.RW }, chunk);
      r.collect();
    }
    expect(r.received.at(-1)).toMatchObject({ op: VSOCK_OP.RST, srcPort: 82, dstPort: 6002 });
    expect(r.dev.stats().open).toBe(0);
  });
});

describe("VsockDevice bounds, reset, save", () => {
  it("bounds the connection table: guest REQUESTs and host clients beyond it are refused", async () => {
    const r = new Rig({ maxConnections: 3 });
    r.postRx(32);
    await listenAt(`${r.udsPath}_90`);
    for (let p = 0; p < 5; p++) r.send({ srcPort: 7000 + p, dstPort: 90, op: VSOCK_OP.REQUEST });
    expect(r.collect().map((p) => p.op)).toEqual([2, 2, 2, 3, 3]);
    expect(r.dev.stats().open).toBe(3);
    const c = net.createConnection(r.udsPath);
    const closed = once(c, "close");
    await r.until(() => c.closed || c.readableEnded, "refused host client");
    await closed;
    expect(r.dev.stats().open).toBe(3);
    r.dev.reset();
    expect(r.dev.stats().open).toBe(0);
    expect(r.dev.backendFds).toEqual([r.dev.listenFd, r.dev.epollFd]);
  });

  it("save() is plain data without connections; restore sends TRANSPORT_RESET on the event queue", () => {
    const r = new Rig();
    const evHead = r.ev.addChain([{ addr: RX_DATA - 0x100, len: 8, write: true }]);
    r.ev.publish(evHead);
    r.dev.notify(VSOCK_EVQ);
    expect(r.ev.takeUsed()).toEqual([]);
    const st = r.dev.save();
    expect(JSON.parse(JSON.stringify(st))).toEqual(st);
    expect(st).toMatchObject({ version: 1, guestCid: 3, activated: true, openConnections: 0 });
    r.mem.writeU32(RX_DATA - 0x100, 0xffffffff);
    r.dev.restore(r.ctx, st);
    expect(r.ev.takeUsed()).toEqual([{ id: evHead, len: 4 }]);
    expect(r.mem.readU32(RX_DATA - 0x100)).toBe(0);
  });
});

describe("VsockDevice against hostile tx packets (fast-check)", () => {
  const u32 = fc.oneof(fc.constantFrom(0, 1, 80, 81, 1024, 1025, 0xffffffff), fc.integer({ min: 0, max: 0xffffffff }));
  const pkt = fc.record({
    srcCid: fc.oneof({ weight: 8, arbitrary: fc.constant(3n) }, { weight: 1, arbitrary: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }) }),
    dstCid: fc.oneof({ weight: 8, arbitrary: fc.constant(2n) }, { weight: 1, arbitrary: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }) }),
    srcPort: fc.oneof({ weight: 4, arbitrary: fc.constantFrom(5000, 5001, 5002) }, { weight: 1, arbitrary: u32 }),
    dstPort: fc.oneof({ weight: 4, arbitrary: fc.constantFrom(80, 81) }, { weight: 1, arbitrary: u32 }),
    op: fc.oneof({ weight: 8, arbitrary: fc.integer({ min: 0, max: 8 }) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffff }) }),
    type: fc.oneof({ weight: 8, arbitrary: fc.constant(1) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffff }) }),
    flags: fc.integer({ min: 0, max: 3 }),
    bufAlloc: u32,
    fwdCnt: u32,
    payload: fc.integer({ min: 0, max: 3000 }),
    lenDelta: fc.oneof({ weight: 6, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.integer({ min: -50, max: 100000 }) }, { weight: 1, arbitrary: fc.constant(0xffffffff) }),
    chainLen: fc.oneof({ weight: 6, arbitrary: fc.constant(-1) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: 60 }) }),
    split: fc.boolean(),
  });
  const step = fc.oneof(
    { weight: 6, arbitrary: pkt.map((p) => ({ kind: "tx" as const, p })) },
    { weight: 2, arbitrary: fc.record({ kind: fc.constant("rx" as const), n: fc.integer({ min: 0, max: 4 }), len: fc.constantFrom(0, 10, 44, 45, 100, 4140) }) },
    { weight: 1, arbitrary: fc.constant({ kind: "pump" as const }) },
  );

  it("never throws, writes only into completed rx buffers and used rings, keeps the table bounded", async () => {
    // A host service on port 80 so some guest REQUESTs succeed and open real connections.
    const probe = new Rig({ maxConnections: 4 });
    await listenAt(`${probe.udsPath}_80`);
    probe.dev.close();
    const path = probe.udsPath;
    fc.assert(
      fc.property(fc.array(step, { minLength: 1, maxLength: 30 }), (steps) => {
        const dev = new VsockDevice({ guestCid: CID, udsPath: path, maxConnections: 4 });
        try {
          const mem = new GuestMemory(new ArrayBuffer(MEM), [{ guestPhysAddr: 0, size: MEM, hostOffset: 0 }]);
          const rx = new QueueDriver(mem, QS, RX_BASE);
          const tx = new QueueDriver(mem, QS, TX_BASE);
          const ev = new QueueDriver(mem, QS, EV_BASE);
          const rxLen = new Map<number, number>();
          dev.activate({ mem, queues: [rx.config, tx.config, ev.config], features: dev.features, interruptQueue: () => undefined, interruptConfig: () => undefined, needsReset: () => undefined });
          for (const s of steps) {
            if (s.kind === "rx") {
              for (let i = 0; i < s.n; i++) {
                const head = rx.addChain([{ addr: 0, len: 0 }]);
                rx.writeDesc(rx.config.descAddr, head, RX_DATA + head * RX_SLOT, s.len, 2, 0);
                rxLen.set(head, s.len);
                rx.publish(head);
              }
            } else if (s.kind === "tx") {
              const p = s.p;
              const head = tx.addChain(p.split ? [{ addr: 0, len: 0 }, { addr: 0, len: 0 }] : [{ addr: 0, len: 0 }]);
              const addr = TX_DATA + head * TX_SLOT;
              const b = new Uint8Array(VSOCK_HDR_LEN + p.payload);
              encodeHeader({ ...p, len: p.lenDelta === 0xffffffff ? 0xffffffff : Math.max(0, p.payload + p.lenDelta) }, b);
              mem.write(addr, b);
              const total = p.chainLen >= 0 ? p.chainLen : b.length;
              if (p.split && total > 20) {
                tx.writeDesc(tx.config.descAddr, head, addr, 20, 1, (head + 1) % QS);
                tx.writeDesc(tx.config.descAddr, (head + 1) % QS, addr + 20, total - 20, 0, 0);
              } else {
                tx.writeDesc(tx.config.descAddr, head, addr, total, 0, 0);
              }
              tx.publish(head);
            }
            const mark = mem.read(0, MEM);
            // The driver's own writes above are allowed; from here on only the device writes.
            dev.notify(VSOCK_TXQ);
            dev.notify(VSOCK_RXQ);
            dev.notify(9);
            const fds = dev.backendFds.filter((fd) => dev.backendWanted(fd));
            for (const i of libc.pollIn(fds, 0)) dev.onBackendReadable(fds[i]!);
            expect(dev.stats().open).toBeLessThanOrEqual(4);
            const allowed: [number, number][] = [rx, tx, ev].map((d) => [d.config.deviceAddr, 6 + 8 * QS]);
            for (const u of rx.takeUsed()) {
              const len = rxLen.get(u.id)!;
              expect(u.len).toBeLessThanOrEqual(len);
              allowed.push([RX_DATA + u.id * RX_SLOT, len]);
            }
            tx.takeUsed().forEach((u) => expect(u.len).toBe(0));
            const now = mem.slice(0, MEM);
            for (let page = 0; page < MEM; page += 4096) {
              if (Buffer.from(now.buffer, now.byteOffset + page, 4096).equals(Buffer.from(mark.buffer, mark.byteOffset + page, 4096))) continue;
              for (let i = page; i < page + 4096; i++) {
                if (now[i] !== mark[i] && !allowed.some(([a, l]) => i >= a && i < a + l)) throw new Error(`device wrote guest byte 0x${i.toString(16)} outside completed rx buffers`);
              }
            }
          }
        } finally {
          dev.close();
        }
      }),
      { numRuns: 60 },
    );
  });
});
