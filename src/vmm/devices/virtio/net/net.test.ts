import fc from "fast-check";
import { afterAll, describe, expect, it } from "vitest";
import * as libc from "../../../../sys/libc.js";
import { GuestMemory } from "../../../memory/guest-memory.js";
import type { ActivateContext, QueueConfig } from "../device.js";
import { featureBit, hasFeature, VIRTIO_F, VIRTIO_ID } from "../device.js";
import { QueueError, SplitQueue } from "../queue/split-queue.js";
import type { DriverBuf } from "../queue/driver.js";
import { QueueDriver } from "../queue/driver.js";
import type { FuzzCase } from "../queue/test-fuzz.js";
import { DATA_AREA, FUZZ_MEM, fuzzCase, INDIRECT_AREA, QSIZE } from "../queue/test-fuzz.js";
import { fakeTap as makeFakeTap } from "./test-tap.js";
import { MAX_FRAME, NET_CONFIG_SIZE, NetDevice, RXQ, TXQ, VIRTIO_NET_F, VNET_HDR_LEN } from "./net.js";

const opened: number[] = [];
afterAll(() => opened.forEach((fd) => libc.close(fd)));
/** `scope`: where the pair is recorded to be closed (the file's afterAll, or one property case's closeCaseTaps). */
const fakeTap = (scope: number[] = opened): { dev: number; host: number } => makeFakeTap(scope);

/** Everything the host side of the fake TAP has received, one Buffer per packet. */
function drain(fd: number): Buffer[] {
  const out: Buffer[] = [];
  const b = new Uint8Array(70000);
  for (;;) {
    const n = libc.readRaw(fd, b);
    if (n < 0) return out;
    out.push(Buffer.from(b.subarray(0, n)));
  }
}

function hostSend(fd: number, frame: Uint8Array, hdr = new Uint8Array(VNET_HDR_LEN)): void {
  const p = new Uint8Array(VNET_HDR_LEN + frame.length);
  p.set(hdr);
  p.set(frame, VNET_HDR_LEN);
  expect(libc.writeRaw(fd, p)).toBe(p.length);
}

const MAC = Uint8Array.of(0x02, 0, 0, 0x12, 0x34, 0x56);
const ALL = featureBit(VIRTIO_F.VERSION_1) | featureBit(VIRTIO_F.INDIRECT_DESC) | featureBit(VIRTIO_F.EVENT_IDX) | featureBit(VIRTIO_NET_F.MRG_RXBUF) | featureBit(VIRTIO_NET_F.MAC) | featureBit(VIRTIO_NET_F.STATUS);
const MEM = 1 << 20;
const RX_BASE = 0;
const TX_BASE = 0x4000;
const DATA = 0x10000;

interface Rig {
  dev: NetDevice;
  mem: GuestMemory;
  rx: QueueDriver;
  tx: QueueDriver;
  host: number;
  resets: string[];
  interrupts: number[];
  ctx: ActivateContext;
}

function rig(features = ALL, opts: { queueSize?: number; mtu?: number } = {}): Rig {
  const tap = fakeTap();
  const dev = new NetDevice({ tapFd: tap.dev, mac: MAC, ...opts });
  const mem = new GuestMemory(new ArrayBuffer(MEM), [{ guestPhysAddr: 0, size: MEM, hostOffset: 0 }]);
  const size = opts.queueSize ?? 16;
  const rx = new QueueDriver(mem, size, RX_BASE);
  const tx = new QueueDriver(mem, size, TX_BASE);
  const resets: string[] = [];
  const interrupts: number[] = [];
  const ctx: ActivateContext = {
    mem,
    queues: [rx.config, tx.config],
    features: features & dev.features,
    interruptQueue: (q) => interrupts.push(q),
    interruptConfig: () => undefined,
    needsReset: (r) => resets.push(r),
  };
  dev.activate(ctx);
  return { dev, mem, rx, tx, host: tap.host, resets, interrupts, ctx };
}

function frame(len: number, seed: number): Uint8Array {
  const f = new Uint8Array(len);
  for (let i = 0; i < len; i++) f[i] = (i * 31 + seed * 7) & 0xff;
  return f;
}

/** Post `n` receive chains of `len` bytes each at DATA + k*0x1000. */
function postRx(r: Rig, n: number, len: number, at = DATA): number[] {
  const heads: number[] = [];
  for (let k = 0; k < n; k++) {
    const h = r.rx.addChain([{ addr: at + k * 0x1000, len, write: true }]);
    r.rx.publish(h);
    heads.push(h);
  }
  return heads;
}

describe("NetDevice identity and config", () => {
  it("is device type 1 with rx+tx+control queues, MAC/STATUS/MRG_RXBUF/VERSION_1, checksum/TSO offloads and GUEST_ANNOUNCE", () => {
    const dev = new NetDevice({ tapFd: 0, mac: MAC });
    expect(dev.deviceType).toBe(VIRTIO_ID.NET);
    expect(dev.queueMaxSizes).toEqual([256, 256, 64]);
    expect(dev.backendFds).toEqual([0]);
    for (const b of [VIRTIO_F.VERSION_1, VIRTIO_NET_F.MAC, VIRTIO_NET_F.STATUS, VIRTIO_NET_F.MRG_RXBUF, VIRTIO_F.EVENT_IDX, VIRTIO_F.INDIRECT_DESC,
      VIRTIO_NET_F.CSUM, VIRTIO_NET_F.GUEST_CSUM, VIRTIO_NET_F.HOST_TSO4, VIRTIO_NET_F.GUEST_TSO4, VIRTIO_NET_F.HOST_TSO6, VIRTIO_NET_F.GUEST_TSO6,
      VIRTIO_NET_F.CTRL_VQ, VIRTIO_NET_F.GUEST_ANNOUNCE]) {
      expect(hasFeature(dev.features, b)).toBe(true);
    }
    for (const b of [VIRTIO_NET_F.HOST_UFO, VIRTIO_NET_F.GUEST_UFO, VIRTIO_NET_F.HOST_ECN, VIRTIO_NET_F.MQ, VIRTIO_NET_F.MTU]) {
      expect(hasFeature(dev.features, b)).toBe(false);
    }
    expect(dev.configSize).toBe(NET_CONFIG_SIZE);
    expect(dev.readConfig(0, 4)).toBe(0x12000002n);
    expect(dev.readConfig(4, 2)).toBe(0x5634n);
    expect(dev.readConfig(6, 2)).toBe(1n); // VIRTIO_NET_S_LINK_UP
    expect(dev.readConfig(8, 2)).toBe(1n); // max_virtqueue_pairs
    expect(dev.readConfig(10, 2)).toBe(0n);
    expect(dev.readConfig(11, 2)).toBe(0n);
    dev.writeConfig(0, 1, 0xffn);
    expect(dev.readConfig(0, 1)).toBe(2n);
  });

  it("offers MTU when given, and refuses bad options", () => {
    const dev = new NetDevice({ tapFd: 0, mac: MAC, mtu: 9000 });
    expect(hasFeature(dev.features, VIRTIO_NET_F.MTU)).toBe(true);
    expect(dev.readConfig(10, 2)).toBe(9000n);
    expect(() => new NetDevice({ tapFd: 0, mac: MAC, mtu: 67 })).toThrow(/MTU/);
    expect(() => new NetDevice({ tapFd: 0, mac: MAC, queueSize: 100 })).toThrow(/power of 2/);
    expect(() => new NetDevice({ tapFd: 0, mac: MAC.subarray(0, 5) })).toThrow(/6 bytes/);
    expect(() => new NetDevice({ tapFd: 0, mac: Uint8Array.of(1, 0, 0, 0, 0, 1) })).toThrow(/multicast/);
  });
});

describe("NetDevice transmit", () => {
  it("writes header + frame gathered from several descriptors as one packet; used len 0", () => {
    const r = rig();
    const f = frame(1000, 1);
    r.mem.fill(DATA, VNET_HDR_LEN, 0);
    r.mem.write(DATA + VNET_HDR_LEN, f.subarray(0, 300));
    r.mem.write(DATA + 0x2000, f.subarray(300));
    const head = r.tx.addChain([
      { addr: DATA, len: VNET_HDR_LEN + 300 },
      { addr: DATA + 0x2000, len: 700 },
    ]);
    r.tx.publish(head);
    r.dev.notify(TXQ);
    expect(r.tx.takeUsed()).toEqual([{ id: head, len: 0 }]);
    const got = drain(r.host);
    expect(got).toHaveLength(1);
    expect(got[0]!.subarray(0, VNET_HDR_LEN).every((b) => b === 0)).toBe(true);
    expect(Buffer.from(got[0]!.subarray(VNET_HDR_LEN)).equals(Buffer.from(f))).toBe(true);
    expect(r.interrupts).toEqual([TXQ]);
    expect(r.dev.stats()).toMatchObject({ txPackets: 1, txBytes: 1000, txDropped: 0 });
  });

  it("gathers a header split over descriptors the same as one read in place", () => {
    const r = rig();
    const f = frame(200, 2);
    // flags 0 and gso_type 0 (no offload), then hdr_len..csum_offset bytes the TAP gets as given.
    const hdr = Uint8Array.of(0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9);
    for (const cut of [12, 5, 1]) {
      r.mem.write(DATA, hdr.subarray(0, cut));
      r.mem.write(DATA + 0x1000, hdr.subarray(cut));
      r.mem.write(DATA + 0x1000 + (12 - cut), f);
      const head = r.tx.addChain(cut === 12 ? [{ addr: DATA, len: 12 }, { addr: DATA + 0x1000, len: 200 }] : [
        { addr: DATA, len: cut },
        { addr: DATA + 0x1000, len: 12 - cut + 200 },
      ]);
      r.tx.publish(head);
      r.dev.notify(TXQ);
      const got = drain(r.host);
      expect(got).toHaveLength(1);
      // num_buffers (bytes 10-11) is zeroed on transmit; the rest of the header passes through.
      expect([...got[0]!.subarray(0, VNET_HDR_LEN)]).toEqual([...hdr.subarray(0, 10), 0, 0]);
      expect(Buffer.from(got[0]!.subarray(VNET_HDR_LEN)).equals(Buffer.from(f))).toBe(true);
    }
    expect(r.dev.stats()).toMatchObject({ txPackets: 3, txDropped: 0 });
  });

  it("drops chains shorter than the header, longer than 64 KiB + header, or with offloads we never offered", () => {
    const r = rig();
    const bad: DriverBuf[][] = [
      [{ addr: DATA, len: VNET_HDR_LEN - 1 }],
      [{ addr: DATA, len: 0x10000 }, { addr: DATA + 0x10000, len: MAX_FRAME - 0x10000 + VNET_HDR_LEN + 1 }],
      [{ addr: DATA + 0x30000, len: 100 }], // NEEDS_CSUM set below
      [{ addr: DATA + 0x31000, len: 100 }], // gso_type TCPV4 set below
      [{ addr: DATA + 0x32000, len: 100, write: true }], // nothing readable
    ];
    r.mem.writeU8(DATA + 0x30000, 1);
    r.mem.writeU8(DATA + 0x31001, 1);
    const heads = bad.map((b) => {
      const h = r.tx.addChain(b);
      r.tx.publish(h);
      return h;
    });
    r.mem.fill(DATA + 0x40000, 200, 0);
    const good = r.tx.addChain([{ addr: DATA + 0x40000, len: 200 }]);
    r.tx.publish(good);
    r.dev.notify(TXQ);
    expect(r.tx.takeUsed()).toEqual([...heads, good].map((id) => ({ id, len: 0 })));
    expect(drain(r.host).map((p) => p.length)).toEqual([200]);
    expect(r.resets).toEqual([]);
    expect(r.dev.stats()).toMatchObject({ txPackets: 1, txDropped: 5 });
  });

  it("passes checksum/TSO headers through once CSUM and HOST_TSO4 are negotiated, and still drops ECN/UFO", () => {
    const r = rig(ALL | featureBit(VIRTIO_NET_F.CSUM) | featureBit(VIRTIO_NET_F.HOST_TSO4));
    const hdrAt = (addr: number, flags: number, gso: number) => {
      r.mem.fill(addr, 200, 0);
      r.mem.writeU8(addr, flags);
      r.mem.writeU8(addr + 1, gso);
      const h = r.tx.addChain([{ addr, len: 200 }]);
      r.tx.publish(h);
      return h;
    };
    hdrAt(DATA, 1, 1); // NEEDS_CSUM + GSO_TCPV4: negotiated
    hdrAt(DATA + 0x1000, 1, 0x81); // TCPV4 | ECN: not offered
    hdrAt(DATA + 0x2000, 1, 3); // UDP (UFO): not offered
    hdrAt(DATA + 0x3000, 1, 4); // TCPV6 without HOST_TSO6
    r.dev.notify(TXQ);
    const sent = drain(r.host);
    expect(sent.map((p) => p.length)).toEqual([200]);
    expect([sent[0]![0], sent[0]![1]]).toEqual([1, 1]);
    expect(r.dev.stats()).toMatchObject({ txPackets: 1, txDropped: 3 });
  });

  it("copies into one buffer when a chain has more pieces than writev takes", () => {
    const r = rig(ALL, { queueSize: 2048 });
    const pieces: DriverBuf[] = [{ addr: DATA, len: VNET_HDR_LEN }];
    r.mem.fill(DATA, VNET_HDR_LEN, 0);
    for (let i = 0; i < 1100; i++) {
      r.mem.writeU8(DATA + 0x100 + i * 2, i & 0xff);
      pieces.push({ addr: DATA + 0x100 + i * 2, len: 1 });
    }
    r.tx.publish(r.tx.addChain(pieces));
    r.dev.notify(TXQ);
    const got = drain(r.host);
    expect(got).toHaveLength(1);
    expect(got[0]!.length).toBe(VNET_HDR_LEN + 1100);
    expect(got[0]![VNET_HDR_LEN + 1099]).toBe(1099 & 0xff);
  });
});

describe("NetDevice receive", () => {
  it("puts one frame per chain with num_buffers 1 and interrupts once per batch", () => {
    const r = rig();
    const heads = postRx(r, 4, 2048);
    const frames = [frame(60, 1), frame(1514, 2), frame(200, 3)];
    for (const f of frames) hostSend(r.host, f);
    r.dev.onBackendReadable(r.dev.backendFds[0]!);
    const used = r.rx.takeUsed();
    expect(used).toEqual(frames.map((f, i) => ({ id: heads[i], len: VNET_HDR_LEN + f.length })));
    frames.forEach((f, i) => {
      const at = DATA + i * 0x1000;
      expect(r.mem.readU16(at + 10)).toBe(1);
      expect(Buffer.from(r.mem.read(at + VNET_HDR_LEN, f.length)).equals(Buffer.from(f))).toBe(true);
    });
    expect(r.interrupts).toEqual([RXQ]);
    expect(r.dev.stats()).toMatchObject({ rxPackets: 3, rxBytes: 60 + 1514 + 200 });
  });

  it("with MRG_RXBUF spreads a big frame over several chains and says how many in num_buffers", () => {
    const r = rig();
    const heads = postRx(r, 6, 1000);
    const f = frame(3000, 9);
    hostSend(r.host, f);
    r.dev.onBackendReadable(r.dev.backendFds[0]!);
    // 12 + 3000 bytes over 1000-byte buffers: 4 chains, the last with 12 bytes.
    expect(r.rx.takeUsed()).toEqual([
      { id: heads[0], len: 1000 },
      { id: heads[1], len: 1000 },
      { id: heads[2], len: 1000 },
      { id: heads[3], len: 12 },
    ]);
    expect(r.mem.readU16(DATA + 10)).toBe(4);
    const joined = Buffer.concat([0, 1, 2, 3].map((k) => Buffer.from(r.mem.read(DATA + k * 0x1000, k === 3 ? 12 : 1000))));
    expect(Buffer.from(joined.subarray(VNET_HDR_LEN)).equals(Buffer.from(f))).toBe(true);
  });

  it("without MRG_RXBUF drops a frame too big for the chain and keeps the chain for the next", () => {
    const r = rig(ALL & ~featureBit(VIRTIO_NET_F.MRG_RXBUF));
    const [head] = postRx(r, 1, 512);
    hostSend(r.host, frame(1000, 1));
    hostSend(r.host, frame(100, 2));
    r.dev.onBackendReadable(r.dev.backendFds[0]!);
    expect(r.rx.takeUsed()).toEqual([{ id: head, len: VNET_HDR_LEN + 100 }]);
    expect(r.mem.readU16(DATA + 10)).toBe(1);
    expect(r.dev.stats()).toMatchObject({ rxPackets: 1, rxDropped: 1 });
  });

  it("stashes the frame when the guest has no buffers, stops wanting the fd, and resumes on notify(rx)", () => {
    for (const features of [ALL, ALL & ~featureBit(VIRTIO_F.EVENT_IDX)]) {
      const r = rig(features);
      const fd = r.dev.backendFds[0]!;
      expect(r.dev.backendWanted(fd)).toBe(true);
      hostSend(r.host, frame(100, 1));
      hostSend(r.host, frame(3000, 2));
      r.dev.onBackendReadable(fd);
      expect(r.rx.takeUsed()).toEqual([]);
      expect(r.dev.backendWanted(fd)).toBe(false);
      if (hasFeature(features, VIRTIO_F.EVENT_IDX)) expect(r.rx.availEvent).toBe(0); // armed: tell us about the next buffer
      // One small buffer: the first frame goes; the 3000-byte one waits holding nothing it cannot use.
      const [h0] = postRx(r, 1, 200);
      r.dev.notify(RXQ);
      expect(r.rx.takeUsed()).toEqual([{ id: h0, len: 112 }]);
      expect(r.dev.backendWanted(fd)).toBe(false);
      const hs = postRx(r, 4, 1024, DATA + 0x10000);
      r.dev.notify(RXQ);
      expect(r.rx.takeUsed().map((u) => u.len)).toEqual([1024, 1024, 964]);
      expect(r.mem.readU16(DATA + 0x10000 + 10)).toBe(3);
      expect(r.dev.backendWanted(fd)).toBe(true);
      expect(r.dev.stats()).toMatchObject({ rxPackets: 2, rxDropped: 0 });
      // The fourth chain is left for the next frame.
      hostSend(r.host, frame(10, 3));
      r.dev.onBackendReadable(fd);
      expect(r.rx.takeUsed()).toEqual([{ id: hs[3], len: 22 }]);
      expect(r.resets).toEqual([]);
    }
  });

  it("save() rewinds rx over chains held for a waiting frame and keeps the frame; restore() delivers it first", () => {
    const r = rig();
    postRx(r, 2, 1000);
    const waiting = frame(3000, 1);
    hostSend(r.host, waiting);
    r.dev.onBackendReadable(r.dev.backendFds[0]!);
    const st = r.dev.save();
    // The rig's driver set up no control queue (queue 2).
    expect(st).toMatchObject({ version: 1, activated: true, queues: [{ nextAvail: 0, nextUsed: 0 }, { nextAvail: 0, nextUsed: 0 }, null] });
    expect(Buffer.from(st.stash!, "base64").length).toBe(VNET_HDR_LEN + 3000);
    const dev2 = new NetDevice({ tapFd: r.dev.backendFds[0]!, mac: MAC });
    dev2.restore(r.ctx, JSON.parse(JSON.stringify(st)) as typeof st);
    hostSend(r.host, frame(500, 2));
    postRx(r, 3, 1000, DATA + 0x20000);
    dev2.notify(RXQ);
    // The 3000-byte frame read before the snapshot goes first, over the two re-offered chains and
    // two new ones (MRG_RXBUF: 3012 bytes with its header), then the new frame.
    const used = r.rx.takeUsed();
    expect(used).toEqual([{ id: 0, len: 1000 }, { id: 1, len: 1000 }, { id: 2, len: 1000 }, { id: 3, len: 12 }, { id: 4, len: 512 }]);
    expect(Buffer.from(r.mem.read(DATA + VNET_HDR_LEN, 1000 - VNET_HDR_LEN))).toEqual(Buffer.from(waiting.subarray(0, 1000 - VNET_HDR_LEN)));
  });

  it("restore() asks the guest to announce itself when GUEST_ANNOUNCE was negotiated; ANNOUNCE_ACK on the control queue clears it (§5.1.6.5.4)", () => {
    const r = rig();
    const st = JSON.parse(JSON.stringify(r.dev.save())) as ReturnType<NetDevice["save"]>;
    const ctrl = new QueueDriver(r.mem, 16, 0x8000);
    let configInterrupts = 0;
    const restoreWith = (features: bigint): NetDevice => {
      const dev = new NetDevice({ tapFd: r.dev.backendFds[0]!, mac: Uint8Array.of(0x02, 0, 0, 0, 0, 0x99) });
      dev.restore({ ...r.ctx, queues: [r.rx.config, r.tx.config, ctrl.config], features: features & dev.features, interruptConfig: () => configInterrupts++ }, st);
      return dev;
    };
    // Without GUEST_ANNOUNCE the driver would not know the bit: nothing is asked.
    const plain = restoreWith(ALL);
    expect(configInterrupts).toBe(0);
    expect(plain.readConfig(6, 2)).toBe(1n);
    const dev = restoreWith(ALL | featureBit(VIRTIO_NET_F.CTRL_VQ) | featureBit(VIRTIO_NET_F.GUEST_ANNOUNCE));
    expect(configInterrupts).toBe(1);
    expect(dev.readConfig(6, 2)).toBe(3n); // LINK_UP | ANNOUNCE
    expect(dev.announcing).toBe(true);
    // The clone's MAC is the one it was built with, not the snapshot's.
    expect(dev.readConfig(5, 1)).toBe(0x99n);
    // An unknown command is refused (VIRTIO_NET_ERR) and changes nothing; ANNOUNCE_ACK clears the bit.
    const cmd = (cls: number, c: number, at: number): number => {
      r.mem.write(at, Uint8Array.of(cls, c));
      r.mem.writeU8(at + 0x10, 0xee);
      const h = ctrl.addChain([{ addr: at, len: 2 }, { addr: at + 0x10, len: 1, write: true }]);
      ctrl.publish(h);
      dev.notify(2);
      return r.mem.readU8(at + 0x10);
    };
    expect(cmd(0, 0, DATA + 0x30000)).toBe(1);
    expect(dev.announcing).toBe(true);
    expect(cmd(3, 0, DATA + 0x30100)).toBe(0);
    expect(dev.announcing).toBe(false);
    expect(dev.readConfig(6, 2)).toBe(1n);
    expect(ctrl.takeUsed()).toEqual([{ id: 0, len: 1 }, { id: 2, len: 1 }]);
  });

  it("reads frames straight into the guest's buffers when they hold a 64 KiB frame; a cut or refused frame is dropped and its chains reused", () => {
    for (const mrg of [true, false]) {
      const r = rig(mrg ? ALL : ALL & ~featureBit(VIRTIO_NET_F.MRG_RXBUF), { queueSize: 256 });
      const big = VNET_HDR_LEN + MAX_FRAME + 100;
      // MRG_RXBUF: 40 chains of two 1024-byte pieces (80 KiB in hand); without: "big packets" chains of 20 pages.
      const heads: number[] = [];
      for (let k = 0; k < (mrg ? 40 : 3); k++) {
        const bufs: DriverBuf[] = mrg
          ? [{ addr: DATA + k * 0x1000, len: 1024, write: true }, { addr: DATA + k * 0x1000 + 0x800, len: 1024, write: true }]
          : Array.from({ length: 20 }, (_, i) => ({ addr: DATA + k * 0x18000 + i * 0x1000, len: 0x1000, write: true }));
        const h = r.rx.addChain(bufs);
        r.rx.publish(h);
        heads.push(h);
      }
      const f1 = frame(3000, 1);
      hostSend(r.host, f1);
      hostSend(r.host, frame(big - VNET_HDR_LEN, 2)); // longer than any frame: cut, dropped
      hostSend(r.host, frame(500, 3), Uint8Array.of(0, 0x80)); // ECN gso type: never negotiated, dropped
      const f4 = frame(60, 4);
      hostSend(r.host, f4);
      r.dev.onBackendReadable(r.dev.backendFds[0]!);
      const used = r.rx.takeUsed();
      expect(r.dev.stats()).toMatchObject({ rxPackets: 2, rxDropped: 2 });
      if (mrg) {
        // 12 + 3000 bytes: two 2048-byte chains; the 60-byte frame takes the next one.
        expect(used).toEqual([
          { id: heads[0], len: 2048 },
          { id: heads[1], len: 964 },
          { id: heads[2], len: 72 },
        ]);
        expect(r.mem.readU16(DATA + 10)).toBe(2);
        const got = Buffer.concat([r.mem.read(DATA, 1024), r.mem.read(DATA + 0x800, 1024), r.mem.read(DATA + 0x1000, 964)]);
        expect(got.subarray(VNET_HDR_LEN).equals(Buffer.from(f1))).toBe(true);
        expect(r.mem.readU16(DATA + 0x2000 + 10)).toBe(1);
        expect(Buffer.from(r.mem.read(DATA + 0x2000 + VNET_HDR_LEN, 60)).equals(Buffer.from(f4))).toBe(true);
      } else {
        expect(used).toEqual([
          { id: heads[0], len: VNET_HDR_LEN + 3000 },
          { id: heads[1], len: VNET_HDR_LEN + 60 },
        ]);
        expect(r.mem.readU16(DATA + 10)).toBe(1);
        expect(Buffer.from(r.mem.read(DATA + VNET_HDR_LEN, 3000)).equals(Buffer.from(f1))).toBe(true);
        expect(Buffer.from(r.mem.read(DATA + 0x18000 + VNET_HDR_LEN, 60)).equals(Buffer.from(f4))).toBe(true);
      }
      expect(r.resets).toEqual([]);
    }
  });

  it("delivers every frame whole and in order, through either path, whatever the chain sizes (property)", () => {
    fc.assert(
      fc.property(
        fc.boolean(),
        fc.array(fc.array(fc.integer({ min: 1, max: 3000 }), { minLength: 1, maxLength: 4 }), { minLength: 1, maxLength: 60 }),
        fc.array(fc.oneof(fc.integer({ min: 14, max: 1600 }), fc.integer({ min: 1600, max: MAX_FRAME })), { minLength: 1, maxLength: 6 }),
        (mrg, chainPieces, lens) => {
          const r = rig(mrg ? ALL : ALL & ~featureBit(VIRTIO_NET_F.MRG_RXBUF), { queueSize: 256 });
          const fd = r.dev.backendFds[0]!;
          // Chains of 1-4 pieces laid out one after another from DATA.
          let at = DATA;
          let capacity = 0;
          let maxChain = 0;
          const pieceOf = new Map<number, { addr: number; len: number }[]>();
          for (const pieces of chainPieces) {
            const bufs = pieces.map((len) => {
              const b = { addr: at, len, write: true };
              at += len + 16;
              return b;
            });
            const h = r.rx.addChain(bufs);
            r.rx.publish(h);
            pieceOf.set(h, bufs);
            const total = pieces.reduce((a, b) => a + b, 0);
            capacity += total;
            maxChain = Math.max(maxChain, total);
          }
          const sent: Uint8Array[] = [];
          lens.forEach((len, i) => {
            const f = frame(len, i);
            const p = new Uint8Array(VNET_HDR_LEN + len);
            p.set(f, VNET_HDR_LEN);
            // The socket's buffer may be full while frames wait: those never left the host.
            if (libc.writeRaw(r.host, p) === p.length) sent.push(f);
            r.dev.onBackendReadable(fd);
          });
          r.dev.notify(RXQ);
          // Rebuild frames from the used ring: num_buffers in each frame's first header says how many chains follow.
          // Chains too small for a header come back empty (len 0) and carry no frame.
          const used = r.rx.takeUsed().filter((u) => u.len > 0);
          const got: Buffer[] = [];
          const written = (u: { id: number; len: number }): Buffer => {
            let left = u.len;
            return Buffer.concat(
              pieceOf.get(u.id)!.map((b) => {
                const take = Math.min(left, b.len);
                left -= take;
                return Buffer.from(r.mem.read(b.addr, take));
              }),
            );
          };
          for (let i = 0; i < used.length; ) {
            // The header (and num_buffers at byte 10) may itself be split over pieces.
            const head = written(used[i]!);
            const n = head.readUInt16LE(10);
            expect(n).toBeGreaterThanOrEqual(1);
            if (!mrg) expect(n).toBe(1);
            const parts = [head];
            for (let k = 1; k < n; k++) parts.push(written(used[i + k]!));
            got.push(Buffer.concat(parts).subarray(VNET_HDR_LEN));
            i += n;
          }
          // What arrived is what was sent, in order, minus dropped frames; nothing twice, nothing torn.
          let j = 0;
          for (const g of got) {
            while (j < sent.length && !Buffer.from(sent[j]!).equals(g)) j++;
            expect(j).toBeLessThan(sent.length);
            j++;
          }
          const st = r.dev.stats();
          expect(st.rxPackets).toBe(got.length);
          // Not delivered nor dropped: one frame waiting in the device for buffers, the rest unread.
          const waiting = r.dev.backendWanted(fd) ? 0 : 1;
          expect(st.rxPackets + st.rxDropped + waiting + drain(fd).length).toBe(sent.length);
          // With MRG_RXBUF and room for every frame, nothing is dropped.
          const need = sent.reduce((a, f) => a + VNET_HDR_LEN + f.length + maxChain, 0);
          if (mrg && capacity >= need) expect(got.length).toBe(sent.length);
          expect(r.resets).toEqual([]);
        },
      ),
      { numRuns: 200 },
    );
  });

  it("before activation and after reset does nothing to guest memory and does not want the fd", () => {
    const tap = fakeTap();
    const dev = new NetDevice({ tapFd: tap.dev, mac: MAC });
    expect(dev.backendWanted(tap.dev)).toBe(false);
    hostSend(tap.host, frame(100, 1));
    expect(() => dev.onBackendReadable(tap.dev)).not.toThrow();
    expect(() => dev.notify(0)).not.toThrow();
    expect(dev.stats().rxDropped).toBe(1); // no driver: dropped, as a NIC without a driver does
    const r = rig();
    r.dev.reset();
    expect(r.dev.backendWanted(r.dev.backendFds[0]!)).toBe(false);
    expect(r.dev.save()).toMatchObject({ activated: false, queues: [] });
  });
});

/* ---------- hostile rings (fast-check) ---------- */

function layCase(mem: GuestMemory, drv: QueueDriver, c: FuzzCase): void {
  c.descs.forEach((d, i) => drv.writeDesc(drv.config.descAddr, i, BigInt(d.addr), d.len, d.flags, d.next));
  c.indirect.forEach((d, i) => drv.writeDesc(INDIRECT_AREA, i, BigInt(d.addr), d.len, d.flags, d.next));
  c.slots.forEach((s, i) => {
    const a = DATA_AREA + i * 512;
    mem.writeU32(a, s.type);
    mem.writeU64(a + 8, s.sector);
    s.words.forEach((w, j) => mem.writeU64(a + 16 + 8 * j, w));
  });
  c.ring.forEach((head, i) => mem.writeU16(drv.config.driverAddr + 4 + 2 * i, head));
  drv.setAvailFlags(c.availFlags);
  drv.setUsedEvent(c.usedEvent);
  drv.setAvailIdx(c.availIdx);
}

/** The fake TAPs of the property case running now: closed after it, as a property makes hundreds. */
const caseFds: number[] = [];
function closeCaseTaps(): void {
  for (const fd of caseFds.splice(0)) libc.close(fd);
}

function fuzzRig(c: FuzzCase, q: number, mrg: boolean) {
  const tap = fakeTap(caseFds);
  const dev = new NetDevice({ tapFd: tap.dev, mac: MAC, queueSize: QSIZE });
  const mem = new GuestMemory(new ArrayBuffer(FUZZ_MEM), [{ guestPhysAddr: 0, size: FUZZ_MEM, hostOffset: 0 }]);
  const drv = new QueueDriver(mem, QSIZE, 0);
  layCase(mem, drv, c);
  let features = featureBit(VIRTIO_F.VERSION_1);
  if (c.eventIdx) features |= featureBit(VIRTIO_F.EVENT_IDX);
  if (c.indirectFeature) features |= featureBit(VIRTIO_F.INDIRECT_DESC);
  if (mrg) features |= featureBit(VIRTIO_NET_F.MRG_RXBUF);
  const none: QueueConfig = { size: 0, descAddr: 0, driverAddr: 0, deviceAddr: 0 };
  const resets: string[] = [];
  const ctx: ActivateContext = {
    mem,
    queues: q === RXQ ? [drv.config] : [none, drv.config],
    features,
    interruptQueue: () => undefined,
    interruptConfig: () => undefined,
    needsReset: (r) => resets.push(r),
  };
  dev.activate(ctx);
  const before = new GuestMemory(mem.read(0, FUZZ_MEM).buffer, [{ guestPhysAddr: 0, size: FUZZ_MEM, hostOffset: 0 }]);
  const ref = new SplitQueue(before, drv.config, { eventIdx: c.eventIdx, indirect: c.indirectFeature });
  // Every chain the reference walker accepts, by head (same head -> same descriptors: the device never writes the tables).
  const chains = new Map<number, { writable: { addr: number; len: number }[]; totalWrite: number; totalRead: number }>();
  for (let i = 0; i < QSIZE; i++) {
    const ch = ref.pop();
    if (ch === undefined || ch instanceof QueueError) break;
    chains.set(ch.head, ch);
  }
  return { tap, dev, mem, drv, before, chains, resets, features };
}

function checkWrites(mem: GuestMemory, before: GuestMemory, allowed: { addr: number; len: number }[]): void {
  const now = mem.slice(0, FUZZ_MEM);
  const old = before.slice(0, FUZZ_MEM);
  for (let i = 0; i < FUZZ_MEM; i++) {
    if (now[i] !== old[i] && !allowed.some((b) => i >= b.addr && i < b.addr + b.len)) {
      throw new Error(`device wrote guest byte 0x${i.toString(16)} outside the writable buffers it completed`);
    }
  }
}

describe("NetDevice on hostile rings (property)", () => {
  it("rx: never throws, writes only into completed chains' writable buffers, used len within them; recovers after reset", () => {
    fc.assert(
      fc.property(fuzzCase([0]), fc.boolean(), fc.array(fc.integer({ min: 14, max: 3000 }), { minLength: 0, maxLength: 6 }), (c, mrg, lens) => {
        const { tap, dev, mem, drv, before, chains } = fuzzRig(c, RXQ, mrg);
        lens.forEach((l, i) => hostSend(tap.host, frame(l, i)));
        expect(() => {
          dev.onBackendReadable(tap.dev);
          dev.notify(RXQ);
          dev.notify(TXQ);
          dev.notify(7);
          dev.onBackendReadable(tap.dev + 1000);
        }).not.toThrow();
        const usedRing = { addr: drv.config.deviceAddr, len: 6 + 8 * QSIZE + 2 };
        const allowed = [usedRing];
        // A driver may post its own used ring as a receive buffer: then frame bytes land on the
        // used elements, as it asked, and they cannot be checked; only where the device wrote can.
        const overlapsUsed = [...chains.values()].some((ch) => ch.writable.some((b) => b.addr < usedRing.addr + usedRing.len && usedRing.addr < b.addr + b.len));
        if (overlapsUsed) {
          for (const ch of chains.values()) allowed.push(...ch.writable);
          drv.takeUsed();
        } else {
          for (const u of drv.takeUsed()) {
            const ch = chains.get(u.id);
            if (ch === undefined) throw new Error(`device completed head ${u.id}, which the reference never accepted`);
            expect(u.len).toBeLessThanOrEqual(ch.totalWrite);
            allowed.push(...ch.writable);
          }
        }
        checkWrites(mem, before, allowed);

        // Recovery: reset, fresh rings, one frame into one good chain.
        dev.reset();
        mem.fill(0, QueueDriver.footprint(QSIZE));
        drain(tap.dev);
        const d2 = new QueueDriver(mem, QSIZE, 0);
        dev.activate({ mem, queues: [d2.config], features: featureBit(VIRTIO_F.VERSION_1), interruptQueue: () => undefined, interruptConfig: () => undefined, needsReset: () => undefined });
        const h = d2.addChain([{ addr: 0x3000, len: 1600, write: true }]);
        d2.publish(h);
        const f = frame(1500, 5);
        hostSend(tap.host, f);
        dev.onBackendReadable(tap.dev);
        expect(d2.takeUsed()).toEqual([{ id: h, len: VNET_HDR_LEN + 1500 }]);
        expect(Buffer.from(mem.read(0x3000 + VNET_HDR_LEN, 1500)).equals(Buffer.from(f))).toBe(true);
      }).afterEach(closeCaseTaps),
      { numRuns: 300 },
    );
  });

  it("tx: never throws, never writes guest memory but the used ring, used len 0, sends only readable bytes of accepted chains", () => {
    fc.assert(
      fc.property(fuzzCase([0]), (c) => {
        const { tap, dev, mem, drv, before, chains } = fuzzRig(c, TXQ, true);
        expect(() => {
          dev.notify(TXQ);
          dev.notify(TXQ);
          dev.notify(RXQ);
          dev.onBackendReadable(tap.dev);
        }).not.toThrow();
        const used = drv.takeUsed();
        for (const u of used) {
          expect(chains.has(u.id)).toBe(true);
          expect(u.len).toBe(0);
        }
        checkWrites(mem, before, [{ addr: drv.config.deviceAddr, len: 6 + 8 * QSIZE + 2 }]);
        const sent = drain(tap.host);
        expect(sent.length).toBeLessThanOrEqual(used.length);
        const lens = new Set([...chains.values()].map((ch) => ch.totalRead));
        for (const p of sent) {
          expect(p.length).toBeGreaterThanOrEqual(VNET_HDR_LEN);
          expect(lens.has(p.length)).toBe(true);
          expect(p[0]).toBe(0);
          expect(p[1]).toBe(0);
        }
      }).afterEach(closeCaseTaps),
      { numRuns: 300 },
    );
  });
});
