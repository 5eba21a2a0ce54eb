import { TypevisorError } from "../../../../errors.js";
import { EAGAIN, EINTR, readRaw } from "../../../../sys/libc.js";
import { addressOf, IoVec } from "../../../../sys/iov.js";
import { setTapOffload, TUN_F, VNET_HDR_LEN } from "../../../../sys/tap.js";
import type { ActivateContext, VirtioDevice, VirtioDeviceInspect } from "../device.js";
import { featureBit, hasFeature, readConfigBytes, VIRTIO_F, VIRTIO_ID } from "../device.js";
import { chainHead, gatherHost, readChain, writeChain } from "../queue/chain.js";
import { activateQueues, inspectQueues, serviceQueue, type ChainResult } from "../queue/runner.js";
import type { DescriptorChain, SplitQueue, SplitQueueState } from "../queue/split-queue.js";
import { QueueError } from "../queue/split-queue.js";
import { formatMac } from "./mac.js";
import { NIC, NIC_SLOT, nicCountersAt, type NicCounters } from "../../../stats/layout.js";

/** virtio-net feature bits (virtio 1.2 §5.1.3). */
export const VIRTIO_NET_F = {
  CSUM: 0,
  GUEST_CSUM: 1,
  CTRL_GUEST_OFFLOADS: 2,
  MTU: 3,
  MAC: 5,
  GUEST_TSO4: 7,
  GUEST_TSO6: 8,
  GUEST_ECN: 9,
  GUEST_UFO: 10,
  HOST_TSO4: 11,
  HOST_TSO6: 12,
  HOST_ECN: 13,
  HOST_UFO: 14,
  MRG_RXBUF: 15,
  STATUS: 16,
  CTRL_VQ: 17,
  GUEST_ANNOUNCE: 21,
  MQ: 22,
} as const;

/** Config status bits (virtio 1.2 §5.1.4). */
export const VIRTIO_NET_S_LINK_UP = 1;
/** The device asks the driver to announce itself (gratuitous ARP / unsolicited NA): virtio 1.2 §5.1.6.5.4. */
export const VIRTIO_NET_S_ANNOUNCE = 2;
/** Control queue classes and commands we serve (virtio 1.2 §5.1.6.5.4), and the ack values (§5.1.6.5). */
export const VIRTIO_NET_CTRL_ANNOUNCE = 3;
export const VIRTIO_NET_CTRL_ANNOUNCE_ACK = 0;
export const VIRTIO_NET_OK = 0;
export const VIRTIO_NET_ERR = 1;
/** virtio_net_hdr flags and gso types (virtio 1.2 §5.1.6). */
export const VIRTIO_NET_HDR_F_NEEDS_CSUM = 1;
export const VIRTIO_NET_HDR_GSO_NONE = 0;
export const VIRTIO_NET_HDR_F_DATA_VALID = 2;
export const VIRTIO_NET_HDR_GSO_TCPV4 = 1;
export const VIRTIO_NET_HDR_GSO_TCPV6 = 4;
export const VIRTIO_NET_HDR_GSO_ECN = 0x80;

const OFFLOAD_FEATURES = [
  VIRTIO_NET_F.CSUM, VIRTIO_NET_F.GUEST_CSUM,
  VIRTIO_NET_F.HOST_TSO4, VIRTIO_NET_F.HOST_TSO6, VIRTIO_NET_F.GUEST_TSO4, VIRTIO_NET_F.GUEST_TSO6,
] as const;

/** Whether a virtio_net_hdr's flags and gso_type use only what was negotiated (§5.1.6.2.1, §5.1.6.4.1). */
function headerAllowed(flags: number, gso: number, f: bigint, dir: "tx" | "rx"): boolean {
  const csum = hasFeature(f, dir === "tx" ? VIRTIO_NET_F.CSUM : VIRTIO_NET_F.GUEST_CSUM);
  const okFlags = dir === "tx" ? VIRTIO_NET_HDR_F_NEEDS_CSUM : VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID;
  if ((flags & ~okFlags) !== 0 || (flags !== 0 && !csum)) return false;
  const type = gso & ~VIRTIO_NET_HDR_GSO_ECN;
  if ((gso & VIRTIO_NET_HDR_GSO_ECN) !== 0) return false; // ECN offloads are not offered
  if (type === VIRTIO_NET_HDR_GSO_NONE) return true;
  // Segmentation also needs the checksum offload (the spec makes TSO depend on CSUM).
  if (!csum) return false;
  if (type === VIRTIO_NET_HDR_GSO_TCPV4) return hasFeature(f, dir === "tx" ? VIRTIO_NET_F.HOST_TSO4 : VIRTIO_NET_F.GUEST_TSO4);
  if (type === VIRTIO_NET_HDR_GSO_TCPV6) return hasFeature(f, dir === "tx" ? VIRTIO_NET_F.HOST_TSO6 : VIRTIO_NET_F.GUEST_TSO6);
  return false;
}
export { VNET_HDR_LEN };

/** Queue indices (virtio 1.2 §5.1.2): receiveq1, transmitq1, controlq (no multiqueue, so it is queue 2). */
export const RXQ = 0;
export const TXQ = 1;
export const CTRLQ = 2;
/** The control queue carries a few tiny commands (Linux sizes it as the device allows and uses one at a time). */
const CTRLQ_SIZE = 64;

/**
 * Config space through mtu (virtio 1.2 §5.1.4): mac[6] @0, le16 status @6,
 * le16 max_virtqueue_pairs @8, le16 mtu @10. Speed/duplex and RSS fields are not offered.
 */
export const NET_CONFIG_SIZE = 12;

/** Largest frame either way: 64 KiB, the most a TSO frame (IP total length) can be. */
export const MAX_FRAME = 65536 + 32; // + Ethernet/VLAN header slack beyond the 64 KiB IP packet
/**
 * Receive buffers the direct path wants in hand: the largest frame a TAP hands over, with its
 * header, plus one byte, so a frame that was cut shows as longer than any legal frame whether the
 * fd reports the full length (a TAP) or the bytes it stored (a datagram socket in tests).
 */
const RX_DIRECT_NEED = VNET_HDR_LEN + MAX_FRAME + 1;
/** Packets moved host -> guest per onBackendReadable call, so one busy TAP cannot starve the device thread. */
const RX_BATCH = 256;

export interface NetDeviceOptions {
  /** Non-blocking TAP fd with a 12-byte vnet header (openTap); the caller keeps ownership. */
  tapFd: number;
  /** The NIC's address, 6 bytes (unicast). */
  mac: Uint8Array;
  /** Offer VIRTIO_NET_F_MTU with this value (68..65535, virtio 1.2 §5.1.4.1). */
  mtu?: number;
  /** Queue size the device allows (power of 2). Default 256. */
  queueSize?: number;
  /**
   * Where this NIC counts its frames (NIC indices of the VMM's stats page: stats/layout.ts), so
   * GET /stats and the daemon read them without asking this thread. Default: an array of its own.
   */
  counters?: Float64Array;
}

export interface NetDeviceState {
  version: 1;
  features: string;
  activated: boolean;
  /** rx cursor rewound over chains we had popped but not used, so they are offered again. */
  queues: (SplitQueueState | null)[];
  /**
   * A frame already read from the TAP that waited for receive buffers (vnet header + frame,
   * base64), so a snapshot does not lose it: restore puts it back and delivers it first.
   */
  stash?: string;
}

/** A NIC's counters, as its slot of the stats page holds them. */
export type NetStats = NicCounters;

type Placed = "done" | "dropped" | "wait" | "broken";

/**
 * virtio-net (virtio 1.2 §5.1) over a TAP fd: one receive and one transmit queue, every frame
 * preceded by the 12-byte struct virtio_net_hdr, which the TAP speaks natively (IFF_VNET_HDR,
 * TUNSETVNETHDRSZ 12), so headers pass through and no offloads are offered yet.
 *
 * TX gathers the chain's readable buffers with writev (guest memory goes to the kernel without a
 * copy; only the header is copied, so what we validate is what the TAP sees). RX reads each frame
 * with one readv straight into the guest's receive buffers when the chains in hand can hold the
 * largest frame (the usual case with MRG_RXBUF, or "big packets" chains); otherwise it reads
 * into a host buffer (a frame's length is unknown until read) and copies it into one chain, or
 * into several with MRG_RXBUF.
 *
 * Back-pressure: when the guest has no receive buffers the frame waits in a one-frame stash,
 * backendWanted() turns false so the device thread stops polling the TAP (poll is
 * level-triggered: polling it would spin), and the next notify(RXQ) resumes. Meanwhile the
 * kernel queues for us and drops beyond the TAP's txqueuelen, as a NIC with a full ring does.
 */
export class NetDevice implements VirtioDevice {
  readonly deviceType = VIRTIO_ID.NET;
  readonly queueMaxSizes: readonly number[];
  readonly features: bigint;
  readonly configSize = NET_CONFIG_SIZE;
  readonly backendFds: readonly number[];
  readonly mac: Uint8Array;
  private readonly tapFd: number;
  private readonly config: Buffer;
  private ctx: ActivateContext | undefined;
  private queues: (SplitQueue | undefined)[] = [];
  private mrg = false;
  /** Host buffer for one received frame: vnet header + frame (+1 to notice truncation). */
  private readonly rxBuf = new Uint8Array(VNET_HDR_LEN + MAX_FRAME + 1);
  /** Bytes of the frame waiting in rxBuf for receive buffers (0 = none). */
  private stashLen = 0;
  /** rx chains popped for the stashed frame but not yet used (popped in avail order). */
  private held: DescriptorChain[] = [];
  private heldBytes = 0;
  /** Transmit header copy; over an explicit ArrayBuffer so it never moves (its address goes in an iovec). */
  private readonly txHdr = new Uint8Array(new ArrayBuffer(64), 0, VNET_HDR_LEN);
  private readonly txHdrAddress = addressOf(this.txHdr);
  private readonly txIov = new IoVec();
  private readonly rxIov = new IoVec();
  /** Fallback when a chain has more pieces than writev takes. */
  private txBuf: Uint8Array | undefined;
  /** Frames and bytes each way (GET /stats), NIC indices; in the stats page when given one. */
  private readonly counters: Float64Array;

  /** @throws TypevisorError NET_OPTIONS, NET_MAC */
  constructor(opts: NetDeviceOptions) {
    this.counters = opts.counters ?? new Float64Array(NIC_SLOT);
    if (this.counters.length < NIC_SLOT) throw new TypevisorError("NET_OPTIONS", `a NIC's counters take ${NIC_SLOT} slots`);
    const size = opts.queueSize ?? 256;
    if (!Number.isInteger(size) || size < 2 || size > 32768 || (size & (size - 1)) !== 0) {
      throw new TypevisorError("NET_OPTIONS", `virtio-net queue size ${size} is not a power of 2 in 2..32768`);
    }
    if (!Number.isInteger(opts.tapFd) || opts.tapFd < 0) throw new TypevisorError("NET_OPTIONS", `virtio-net TAP fd ${opts.tapFd} is not a file descriptor`);
    if (opts.mac.length !== 6) throw new TypevisorError("NET_MAC", `a MAC address has 6 bytes, got ${opts.mac.length}`);
    if ((opts.mac[0]! & 1) !== 0) throw new TypevisorError("NET_MAC", `MAC address ${formatMac(opts.mac)} is multicast`);
    if (opts.mtu !== undefined && (!Number.isInteger(opts.mtu) || opts.mtu < 68 || opts.mtu > 65535)) {
      throw new TypevisorError("NET_OPTIONS", `virtio-net MTU ${opts.mtu} is not in 68..65535`);
    }
    this.tapFd = opts.tapFd;
    this.backendFds = [opts.tapFd];
    this.mac = Uint8Array.from(opts.mac);
    this.queueMaxSizes = [size, size, CTRLQ_SIZE];

    let f = featureBit(VIRTIO_F.VERSION_1) | featureBit(VIRTIO_F.INDIRECT_DESC) | featureBit(VIRTIO_F.EVENT_IDX);
    f |= featureBit(VIRTIO_NET_F.MAC) | featureBit(VIRTIO_NET_F.STATUS) | featureBit(VIRTIO_NET_F.MRG_RXBUF);
    // GUEST_ANNOUNCE (which needs CTRL_VQ and STATUS, virtio 1.2 §5.1.3.1): after a restore, in
    // particular in a clone with its own MAC, the device asks the guest to announce itself so
    // switches and neighbours learn where it is now (§5.1.6.5.4).
    f |= featureBit(VIRTIO_NET_F.CTRL_VQ) | featureBit(VIRTIO_NET_F.GUEST_ANNOUNCE);
    // Checksum and TCP segmentation offloads both ways: the TAP speaks the same virtio_net_hdr
    // (Documentation/networking/tuntap.rst, IFF_VNET_HDR), so headers pass through and a 64 KiB
    // TSO frame costs one trip instead of ~45 MTU-sized ones (virtio 1.2 §5.1.6.2, §5.1.6.4).
    for (const bit of OFFLOAD_FEATURES) f |= featureBit(bit);
    if (opts.mtu !== undefined) f |= featureBit(VIRTIO_NET_F.MTU);
    this.features = f;

    const c = Buffer.alloc(NET_CONFIG_SIZE);
    c.set(this.mac, 0);
    c.writeUInt16LE(VIRTIO_NET_S_LINK_UP, 6);
    c.writeUInt16LE(1, 8);
    if (opts.mtu !== undefined) c.writeUInt16LE(opts.mtu, 10);
    this.config = c;
  }

  readConfig(offset: number, size: number): bigint {
    return readConfigBytes(this.config, offset, size);
  }

  /** Read-only for a modern driver: mac is writable only by legacy drivers (virtio 1.2 §5.1.4.2). */
  writeConfig(_offset: number, _size: number, _value: bigint): void {}

  activate(ctx: ActivateContext): void {
    this.start(ctx);
  }

  /**
   * Resume from a snapshot: queues from their cursors, the frame that waited for buffers (if
   * any) back in hand, and, when the driver negotiated VIRTIO_NET_F_GUEST_ANNOUNCE, a request to
   * announce itself (VIRTIO_NET_S_ANNOUNCE and a configuration interrupt, §5.1.6.5.4): the
   * machine may now be elsewhere on the network, or a clone with this device's (new) MAC, which
   * the config space already holds since it comes from this device's options, not the snapshot.
   */
  restore(ctx: ActivateContext, state: NetDeviceState): void {
    if (state.version !== 1) throw new TypevisorError("SNAPSHOT_VERSION", `virtio-net state version ${String(state.version)} is not supported`);
    if (!state.activated) return;
    this.start(ctx, state.queues);
    if (state.stash !== undefined) {
      const frame = Buffer.from(state.stash, "base64");
      if (frame.length < VNET_HDR_LEN || frame.length > VNET_HDR_LEN + MAX_FRAME) throw new TypevisorError("SNAPSHOT_INVALID", `virtio-net saved frame of ${frame.length} bytes is not ${VNET_HDR_LEN}..${VNET_HDR_LEN + MAX_FRAME}`);
      this.rxBuf.set(frame);
      this.stashLen = frame.length;
    }
    if (hasFeature(ctx.features, VIRTIO_NET_F.GUEST_ANNOUNCE)) {
      this.setStatus(this.status() | VIRTIO_NET_S_ANNOUNCE);
      ctx.interruptConfig();
    }
  }

  /** The config space status field (le16 at 6, §5.1.4). */
  private status(): number {
    return this.config.readUInt16LE(6);
  }
  private setStatus(v: number): void {
    this.config.writeUInt16LE(v & 0xffff, 6);
  }

  /** Whether the device is waiting for the driver's VIRTIO_NET_CTRL_ANNOUNCE_ACK. */
  get announcing(): boolean {
    return (this.status() & VIRTIO_NET_S_ANNOUNCE) !== 0;
  }

  private start(ctx: ActivateContext, saved?: readonly (SplitQueueState | null)[]): void {
    this.dropStash();
    this.ctx = ctx;
    this.mrg = hasFeature(ctx.features, VIRTIO_NET_F.MRG_RXBUF);
    // Tell the TAP which offloaded frames the guest accepts (TUNSETOFFLOAD takes the reader's view).
    const f = ctx.features;
    let tun = 0;
    if (hasFeature(f, VIRTIO_NET_F.GUEST_CSUM)) {
      tun |= TUN_F.CSUM;
      if (hasFeature(f, VIRTIO_NET_F.GUEST_TSO4)) tun |= TUN_F.TSO4;
      if (hasFeature(f, VIRTIO_NET_F.GUEST_TSO6)) tun |= TUN_F.TSO6;
    }
    setTapOffload(this.tapFd, tun);
    this.queues = activateQueues(ctx, this.queueMaxSizes, saved);
  }

  notify(q: number): void {
    const ctx = this.ctx;
    if (ctx === undefined) return;
    if (q === TXQ) serviceQueue(ctx, TXQ, this.queues[TXQ], (chain) => this.transmit(ctx, chain));
    else if (q === RXQ) this.receive();
    else if (q === CTRLQ && hasFeature(ctx.features, VIRTIO_NET_F.CTRL_VQ)) serviceQueue(ctx, CTRLQ, this.queues[CTRLQ], (chain) => this.control(ctx, chain));
  }

  /**
   * Whether the device thread should poll `fd` now: false before activation, with the receive
   * queue missing or broken, and while a frame waits for receive buffers. Re-evaluate after every
   * activate/notify/reset/onBackendReadable (all run on the device thread).
   */
  backendWanted(fd: number): boolean {
    if (fd !== this.tapFd || this.ctx === undefined) return false;
    const rq = this.queues[RXQ];
    return rq !== undefined && rq.broken === undefined && this.stashLen === 0;
  }

  onBackendReadable(fd: number): void {
    if (fd !== this.tapFd) return;
    if (this.ctx === undefined) {
      // No driver: a NIC without a driver drops what arrives (and the device thread should not
      // be polling us now; draining keeps a caller that does from spinning).
      this.drainAndDrop();
      return;
    }
    this.receive();
  }

  /** Where the queues stand (GET /threads). */
  inspect(): VirtioDeviceInspect {
    return { queues: inspectQueues(this.queues, this.queueMaxSizes.length) };
  }

  reset(): void {
    this.dropStash();
    if (this.ctx !== undefined) setTapOffload(this.tapFd, 0);
    this.setStatus(this.status() & ~VIRTIO_NET_S_ANNOUNCE);
    this.ctx = undefined;
    this.queues = [];
    this.mrg = false;
  }

  save(): NetDeviceState {
    const held = this.held.length;
    return {
      version: 1,
      features: (this.ctx?.features ?? 0n).toString(16),
      activated: this.ctx !== undefined,
      queues: this.queues.map((q, i) => {
        const st = q?.save() ?? null;
        // Popped-but-unused rx chains were taken in avail order right before nextAvail.
        if (st !== null && i === RXQ && held > 0) st.nextAvail = (st.nextAvail - held) & 0xffff;
        return st;
      }),
      ...(this.stashLen > 0 ? { stash: Buffer.from(this.rxBuf.subarray(0, this.stashLen)).toString("base64") } : {}),
    };
  }

  /**
   * One control command (virtio 1.2 §5.1.6.5): class and command bytes (and data) readable, the
   * one-byte ack writable. Only VIRTIO_NET_CTRL_ANNOUNCE_ACK is served (the other classes need
   * features we do not offer: CTRL_RX, CTRL_VLAN, MQ, CTRL_MAC_ADDR, CTRL_GUEST_OFFLOADS); the
   * rest are answered VIRTIO_NET_ERR, as the spec has the device do for what it does not support.
   */
  private control(ctx: ActivateContext, chain: DescriptorChain): ChainResult {
    if (chain.totalWrite < 1) return new QueueError("VIRTIO_NET_CTRL", `control command ${chain.head} has no writable ack byte`);
    let ack = VIRTIO_NET_ERR;
    if (chain.totalRead >= 2) {
      const [cls, cmd] = readChain(ctx.mem, chain.readable, 0, 2);
      if (cls === VIRTIO_NET_CTRL_ANNOUNCE && cmd === VIRTIO_NET_CTRL_ANNOUNCE_ACK && hasFeature(ctx.features, VIRTIO_NET_F.GUEST_ANNOUNCE)) {
        // §5.1.6.5.4: the device MUST clear VIRTIO_NET_S_ANNOUNCE when it receives the ack.
        this.setStatus(this.status() & ~VIRTIO_NET_S_ANNOUNCE);
        ack = VIRTIO_NET_OK;
      }
    }
    writeChain(ctx.mem, chain.writable, Uint8Array.of(ack));
    return 1;
  }

  /** Packet and byte counters since construction. */
  stats(): NetStats {
    return nicCountersAt(this.counters, 0);
  }

  private count(i: number, n: number): void {
    this.counters[i] = this.counters[i]! + n;
  }

  private dropStash(): void {
    if (this.stashLen > 0) this.count(NIC.RX_DROPPED, 1);
    this.stashLen = 0;
    this.held = [];
    this.heldBytes = 0;
  }

  private drainAndDrop(): void {
    for (let i = 0; i < RX_BATCH; i++) {
      const n = readRaw(this.tapFd, this.rxBuf);
      if (n === -EINTR) continue;
      if (n <= 0) return;
      this.count(NIC.RX_DROPPED, 1);
    }
  }

  /** One transmit chain (virtio 1.2 §5.1.6.2): header + frame in the readable part; used len 0. */
  private transmit(ctx: ActivateContext, chain: DescriptorChain): number {
    const len = chain.totalRead;
    // Driver mistakes on tx cost only that packet (as a NIC drops a bad frame); the queue goes on.
    if (len < VNET_HDR_LEN || len > VNET_HDR_LEN + MAX_FRAME) {
      this.count(NIC.TX_DROPPED, 1);
      return 0;
    }
    const hdr = this.txHdr;
    // Copied (in place when the first buffer holds it), so what we validate is what the TAP gets.
    hdr.set(chainHead(ctx.mem, chain.readable, VNET_HDR_LEN));
    // §5.1.6.2.1: NEEDS_CSUM only with CSUM, a gso_type only with its HOST_TSO*; anything else would
    // hand the host stack offload work we never agreed to. The TAP re-validates the header too.
    if (!headerAllowed(hdr[0]!, hdr[1]!, ctx.features, "tx")) {
      this.count(NIC.TX_DROPPED, 1);
      return 0;
    }
    // num_buffers is unused on transmit (§5.1.6.2); the TAP ignores bytes 10-11 anyway.
    hdr[10] = 0;
    hdr[11] = 0;
    // Our header copy, then the frame's bytes where they lie in guest memory (host addresses
    // from the descriptor walk, which bounds-checked every buffer).
    const iov = this.txIov;
    iov.clear();
    iov.push(this.txHdrAddress, VNET_HDR_LEN);
    let r: number;
    if (gatherHost(iov, chain.readable, VNET_HDR_LEN, len - VNET_HDR_LEN)) {
      r = iov.writev(this.tapFd);
    } else {
      // More pieces than writev takes (IOV_MAX): gather into one host buffer.
      const buf = (this.txBuf ??= new Uint8Array(VNET_HDR_LEN + MAX_FRAME));
      buf.set(hdr);
      buf.set(readChain(ctx.mem, chain.readable, VNET_HDR_LEN, len - VNET_HDR_LEN), VNET_HDR_LEN);
      iov.clear();
      iov.push(addressOf(buf), len);
      r = iov.writev(this.tapFd);
    }
    if (r === len) {
      this.count(NIC.TX_PACKETS, 1);
      this.count(NIC.TX_BYTES, len - VNET_HDR_LEN);
    } else {
      // EIO (TAP down), EINVAL (runt frame), EAGAIN: a NIC drops the frame and goes on.
      this.count(NIC.TX_DROPPED, 1);
    }
    return 0;
  }

  /** Move frames TAP -> guest until the TAP is empty, the guest has no buffers, or a batch is done. */
  private receive(): void {
    const ctx = this.ctx;
    const q = this.queues[RXQ];
    if (ctx === undefined || q === undefined || q.broken !== undefined) return;
    try {
      for (let packets = 0; ; ) {
        if (this.stashLen === 0) {
          if (packets >= RX_BATCH) break;
          const d = this.receiveDirect(ctx, q);
          if (d === "done") {
            packets++;
            continue;
          }
          if (d === "dropped") continue;
          if (d === "empty" || d === "broken") break;
          // "fallback": not enough receive buffers in hand for any frame; read into rxBuf.
          const n = readRaw(this.tapFd, this.rxBuf);
          if (n === -EINTR) continue;
          if (n === -EAGAIN || n <= 0) break;
          if (n < VNET_HDR_LEN || n > VNET_HDR_LEN + MAX_FRAME) {
            // Shorter than the header we configured, or truncated by our buffer: not a frame we can pass on.
            this.count(NIC.RX_DROPPED, 1);
            continue;
          }
          this.stashLen = n;
        }
        const r = this.place(ctx, q);
        if (r === "wait" || r === "broken") break;
        this.stashLen = 0;
        packets++;
      }
    } catch (e) {
      // Chains are validated; this is a bug or memory changing under us: fail the queue, not the VMM.
      const err = q.poison(new QueueError("VIRTQ_INTERNAL", e instanceof Error ? e.message : String(e)));
      ctx.needsReset(`queue ${RXQ}: ${err.message}`);
      this.dropStash();
    } finally {
      try {
        if (q.needsInterrupt()) ctx.interruptQueue(RXQ);
      } catch {
        // needsInterrupt reads validated ring addresses; nothing sensible to do if that fails.
      }
    }
  }

  /**
   * Read the next frame straight into the guest's receive buffers: one readv over every chain in
   * hand, no host copy. Only when those chains hold the largest frame a TAP can hand over, since
   * a frame's length is unknown until it is read; a TAP read reports a frame's full length even
   * when the buffers cut it short (tun_put_user returns it), so a cut frame is seen and dropped.
   * The chains the frame filled go back to the driver in order, with num_buffers (§5.1.6.4: 1
   * without MRG_RXBUF, else how many) written into the first one's header; the rest stay held
   * for the next frame. "fallback": the ring does not hold that much (or, without MRG_RXBUF,
   * the chain is too small for every frame), so the caller reads into rxBuf; "empty": the TAP
   * has no frame.
   */
  private receiveDirect(ctx: ActivateContext, q: SplitQueue): "done" | "dropped" | "empty" | "fallback" | "broken" {
    while (this.heldBytes < RX_DIRECT_NEED) {
      // Without MRG_RXBUF a frame goes into exactly one chain.
      if (!this.mrg && this.held.length > 0) return "fallback";
      if (this.held.length >= q.config.size) return "fallback";
      const c = this.popRx(ctx, q);
      if (c === "broken") return "broken";
      if (c === "wait") return "fallback";
      if (c.totalWrite < VNET_HDR_LEN) {
        // As in place(): a buffer that cannot hold the header goes back empty (§5.1.6.3.1).
        q.pushUsed(c.head, 0);
        continue;
      }
      this.held.push(c);
      this.heldBytes += c.totalWrite;
    }
    const iov = this.rxIov;
    iov.clear();
    for (const c of this.held) {
      if (!gatherHost(iov, c.writable, 0, c.totalWrite)) break;
    }
    if (iov.bytes < RX_DIRECT_NEED) return "fallback";
    let n = iov.readv(this.tapFd);
    while (n === -EINTR) n = iov.readv(this.tapFd);
    // EAGAIN: nothing queued. Other errors (EIO while the TAP is down) also end this round.
    if (n <= 0) return "empty";
    if (n < VNET_HDR_LEN || n > Math.min(iov.bytes, VNET_HDR_LEN + MAX_FRAME) || !this.rxHeaderAllowed(ctx, this.held[0]!)) {
      // Short, cut or with offloads the guest did not negotiate (§5.1.6.4.1): the chains stay held.
      this.count(NIC.RX_DROPPED, 1);
      return "dropped";
    }
    this.complete(ctx, q, n);
    return "done";
  }

  /** The TAP's header flags and gso_type (§5.1.6) as it wrote them into `chain`: offloads the guest agreed to? */
  private rxHeaderAllowed(ctx: ActivateContext, chain: DescriptorChain): boolean {
    const h = chainHead(ctx.mem, chain.writable, 2);
    return headerAllowed(h[0]!, h[1]!, ctx.features, "rx");
  }

  /**
   * Hand back the held chains that a `len`-byte frame, already in them, fills (virtio 1.2
   * §5.1.6.4): num_buffers into the first one's header (so 1 without MRG_RXBUF), then one used
   * element per chain, in order; chains past the frame stay held. Needs heldBytes >= len.
   */
  private complete(ctx: ActivateContext, q: SplitQueue, len: number): void {
    let count = 0;
    for (let filled = 0; filled < len; ) filled += this.held[count++]!.totalWrite;
    // num_buffers, le16 at offset 10 of the header: in place when the first buffer holds it.
    const first = this.held[0]!.writable[0]!;
    if (first.len >= VNET_HDR_LEN) ctx.mem.writeU16(first.addr + 10, count);
    else writeChain(ctx.mem, this.held[0]!.writable, Uint8Array.of(count & 0xff, count >>> 8), 10);
    let off = 0;
    for (let i = 0; i < count; i++) {
      const c = this.held[i]!;
      const k = Math.min(c.totalWrite, len - off);
      q.pushUsed(c.head, k);
      off += k;
      this.heldBytes -= c.totalWrite;
    }
    this.held.splice(0, count);
    this.delivered(len);
  }

  /** Next rx chain, arming the notification when the ring is empty (virtio 1.2 §2.7.10). */
  private popRx(ctx: ActivateContext, q: SplitQueue): DescriptorChain | "wait" | "broken" {
    for (;;) {
      const c = q.pop();
      if (c instanceof QueueError) {
        ctx.needsReset(`queue ${RXQ}: ${c.message}`);
        this.dropStash();
        return "broken";
      }
      if (c !== undefined) return c;
      if (!q.armNotification()) return "wait";
    }
  }

  /** Put the stashed frame (rxBuf[0, stashLen)) into receive chains (virtio 1.2 §5.1.6.4). */
  private place(ctx: ActivateContext, q: SplitQueue): Placed {
    const need = this.stashLen;
    const buf = this.rxBuf;
    // The TAP produces only the offloads set with TUNSETOFFLOAD, i.e. what the guest negotiated;
    // check anyway (§5.1.6.4.1) and pass the header through. num_buffers is ours to fill.
    if (!headerAllowed(buf[0]!, buf[1]!, ctx.features, "rx")) {
      this.count(NIC.RX_DROPPED, 1);
      return "dropped";
    }

    if (!this.mrg) {
      // One chain per frame; §5.1.6.4: num_buffers MUST be 1 without MRG_RXBUF.
      while (this.held.length === 0) {
        const c = this.popRx(ctx, q);
        if (typeof c === "string") return c;
        // A chain that cannot even hold the header would be kept forever below; hand it back empty.
        if (c.totalWrite < VNET_HDR_LEN) {
          q.pushUsed(c.head, 0);
        } else {
          this.held = [c];
          this.heldBytes = c.totalWrite;
        }
      }
      const chain = this.held[0]!;
      if (chain.totalWrite < need) {
        // The driver SHOULD post buffers for a full frame (§5.1.6.3.1); this one is too small.
        // Drop the frame and keep the chain for the next (smaller) one.
        this.count(NIC.RX_DROPPED, 1);
        return "dropped";
      }
      writeChain(ctx.mem, chain.writable, buf.subarray(0, need));
      this.complete(ctx, q, need);
      return "done";
    }

    // MRG_RXBUF: fill chain after chain; num_buffers in the first header says how many.
    while (this.heldBytes < need) {
      if (this.held.length >= q.config.size) {
        // Every buffer the ring can hold is not enough: waiting would deadlock; drop the frame.
        this.count(NIC.RX_DROPPED, 1);
        return "dropped";
      }
      const c = this.popRx(ctx, q);
      if (typeof c === "string") return c;
      if (c.totalWrite < VNET_HDR_LEN) {
        // §5.1.6.3.1: with MRG_RXBUF every buffer holds at least the header. Give it back empty
        // (the driver counts a length error) rather than splitting a header across buffers.
        q.pushUsed(c.head, 0);
        continue;
      }
      this.held.push(c);
      this.heldBytes += c.totalWrite;
    }
    // The direct path may hold more chains than this frame needs: fill only as many as it takes.
    for (let i = 0, off = 0; off < need; i++) {
      const chain = this.held[i]!;
      const n = Math.min(chain.totalWrite, need - off);
      writeChain(ctx.mem, chain.writable, buf.subarray(off, off + n));
      off += n;
    }
    this.complete(ctx, q, need);
    return "done";
  }

  private delivered(len: number): void {
    this.count(NIC.RX_PACKETS, 1);
    this.count(NIC.RX_BYTES, len - VNET_HDR_LEN);
  }
}
