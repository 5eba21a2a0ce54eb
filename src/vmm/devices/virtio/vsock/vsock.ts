import { lstatSync } from "node:fs";
import { TypevisorError } from "../../../../errors.js";
import { close as closeFd, EAGAIN, EINTR, readRaw, writeRaw, writevRaw } from "../../../../sys/libc.js";
import {
  ECONNREFUSED,
  EPOLL_CTL_ADD,
  EPOLL_CTL_DEL,
  EPOLLOUT,
  epollCreate,
  epollCtl,
  epollReady,
  SHUT_WR,
  shutdownSocket,
  unixAccept,
  unixConnect,
  unixListen,
  unixPathProblem,
  unlinkPath,
  UNIX_PATH_MAX,
} from "../../../../sys/unix-socket.js";
import type { ActivateContext, VirtioDevice, VirtioDeviceInspect } from "../device.js";
import { featureBit, VIRTIO_F, VIRTIO_ID } from "../device.js";
import { chainSlices, readChain, writeChain } from "../queue/chain.js";
import { activateQueues, inspectQueues, serviceQueue } from "../queue/runner.js";
import type { DescriptorChain, SplitQueue, SplitQueueState } from "../queue/split-queue.js";
import { QueueError } from "../queue/split-queue.js";
import type { VsockHeader } from "./packet.js";
import {
  decodeHeader,
  encodeHeader,
  VSOCK_EVENT_TRANSPORT_RESET,
  VSOCK_HDR_LEN,
  VSOCK_HOST_CID,
  VSOCK_OP,
  VSOCK_SHUTDOWN_RCV,
  VSOCK_SHUTDOWN_SEND,
  VSOCK_TYPE_STREAM,
} from "./packet.js";

/** Queue indices (virtio 1.2 §5.10.2): rx (device -> driver), tx (driver -> device), event. */
export const VSOCK_RXQ = 0;
export const VSOCK_TXQ = 1;
export const VSOCK_EVQ = 2;
/** Config space (virtio 1.2 §5.10.4): le64 guest_cid. */
export const VSOCK_CONFIG_SIZE = 8;

/** Largest payload per packet either way; Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE is the same 64 KiB. */
export const VSOCK_MAX_PAYLOAD = 64 * 1024;
/**
 * The receive buffer we advertise per connection (buf_alloc, virtio 1.2 §5.10.6.3). It is also
 * the bound on what we keep for a unix stream that is not draining: the guest may only send what
 * our credit allows, so a guest that sends more than this is breaking the protocol and is reset.
 */
export const VSOCK_BUF_ALLOC = 256 * 1024;
/** At most this many connections (including host clients that have not sent CONNECT yet): one host fd each. */
export const VSOCK_MAX_CONNECTIONS = 1024;
/** First local (host-side) port handed to host-initiated connections; ports below stay free for guest-initiated ones. */
export const VSOCK_FIRST_EPHEMERAL_PORT = 1024;
/**
 * A host client that sends no CONNECT line, or whose REQUEST the guest leaves unanswered, this
 * long is dropped (stream closed; RST to the guest for a REQUEST), so neither can hold a table slot
 * forever. Checked whenever the device runs (any kick or readable fd), not by a timer.
 */
export const VSOCK_REQUEST_TIMEOUT_MS = 5000;

/** Send CREDIT_UPDATE once we have freed this much since the guest last heard our fwd_cnt. */
const CREDIT_UPDATE_THRESHOLD = 64 * 1024;
/** Longest "CONNECT <port>\n" line we accept from a host client. */
const MAX_CONNECT_LINE = 32;
/** Packets moved unix stream -> guest per readable call, so one stream cannot starve the rest. */
const RX_BATCH = 16;
/** Host clients accepted per readable call on the listener. */
const ACCEPT_BATCH = 64;
/** Stop taking tx packets while this many replies wait for rx buffers (vhost-style back-pressure). */
const CTL_SOFT_LIMIT = 512;
/** Replies to packets of unknown connections (RSTs) dropped beyond this, whatever happens. */
const CTL_HARD_LIMIT = 2048;
/** After EMFILE/ENFILE on accept, leave the listener out of poll this long (else poll spins). */
const ACCEPT_BACKOFF_MS = 200;
const QUEUE_SIZE = 256;

export interface VsockDeviceOptions {
  /** The guest's CID: 3..0xfffffffe (0-2 are reserved, 0xffffffff is VMADDR_CID_ANY). */
  guestCid: number;
  /**
   * Host unix socket path: the device listens here for host-initiated connections, and connects
   * to `${udsPath}_${port}` for guest-initiated ones (Firecracker's scheme).
   */
  udsPath: string;
  /** Connection table size (default VSOCK_MAX_CONNECTIONS): bounds the host fds a guest can make us open. */
  maxConnections?: number;
}

export interface VsockStats {
  /** Connections accepted from host clients / asked for by the guest, since construction. */
  hostConnections: number;
  guestConnections: number;
  /** Guest-initiated REQUESTs refused (nobody listening on `${udsPath}_${port}`, table full, ...). */
  guestRefused: number;
  /** Open connections now. */
  open: number;
  /** tx packets dropped or answered with RST because they broke the rules. */
  txInvalid: number;
  bytesToGuest: number;
  bytesFromGuest: number;
}

export interface VsockDeviceState {
  version: 1;
  guestCid: number;
  udsPath: string;
  features: string;
  activated: boolean;
  /** Cursors; the rx one is rewound over a chain we had popped and not used. */
  queues: (SplitQueueState | null)[];
  /**
   * Connections are NOT saved: their host ends are unix sockets of this process. A restored
   * device starts with none and tells the guest so with a TRANSPORT_RESET event (§5.10.6.6).
   */
  openConnections: number;
}

type ConnState = "await-connect" | "requesting" | "established";

interface Conn {
  fd: number;
  state: ConnState;
  /** Host-side vsock port (ours) and the guest's port: the connection's identity on the wire. */
  localPort: number;
  peerPort: number;
  /** Bytes of the CONNECT line so far (await-connect). */
  line: number[];
  /** When the client was accepted / the REQUEST sent (for VSOCK_REQUEST_TIMEOUT_MS). */
  requestedAt: number;
  // The guest's receive credit (§5.10.6.3): what it advertised and what we sent (u32 counters).
  peerBufAlloc: number;
  peerFwdCnt: number;
  txCnt: number;
  // Ours: bytes taken from the guest, bytes written to the unix stream, fwd_cnt last told the guest.
  rxCnt: number;
  fwdCnt: number;
  fwdCntSent: number;
  /** Guest bytes the unix stream would not take yet (at most VSOCK_BUF_ALLOC). */
  out: Uint8Array[];
  outBytes: number;
  /** Registered for EPOLLOUT in the writability epoll. */
  watching: boolean;
  /** The unix stream reached EOF: the host will send no more (we told the guest with SHUTDOWN SEND). */
  hostEof: boolean;
  /** The guest's SHUTDOWN flags so far. */
  guestNoRecv: boolean;
  guestNoSend: boolean;
  /** shutdown(SHUT_WR) done on the stream after the guest's SEND shutdown and a drained buffer. */
  wrShut: boolean;
  creditQueued: boolean;
  closed: boolean;
}

/** A packet waiting for an rx buffer; `conn` fills buf_alloc/fwd_cnt when it goes out. */
interface Ctl {
  op: number;
  localPort: number;
  peerPort: number;
  flags: number;
  conn: Conn | undefined;
}

function u32(n: number): number {
  return n >>> 0;
}

/**
 * virtio-vsock (virtio 1.2 §5.10) with a Firecracker-style host side (Firecracker docs/vsock.md):
 *
 * - Host-initiated: a host program connects to the unix socket at `udsPath`, writes
 *   "CONNECT <port>\n"; we pick a local port, send REQUEST to the guest's <port>, and on RESPONSE
 *   write "OK <localport>\n" to the stream and relay from then on; an RST closes the stream.
 * - Guest-initiated: a guest REQUEST to (CID 2, port P) connects to `${udsPath}_${P}`: RESPONSE
 *   if that succeeds, RST if not.
 *
 * Everything runs on the device thread, which polls `backendFds` for readability: the listener,
 * every connection's stream (left out by backendWanted while the guest cannot take its data:
 * no credit, no rx buffers, replies pending), and one epoll fd. The epoll fd is how writability
 * is handled: a stream that would not take guest data (EAGAIN) keeps it in a per-connection
 * buffer (bounded by the credit we advertised) and is registered for EPOLLOUT; the epoll fd turns
 * readable when any such stream can take more, and onBackendReadable(epollFd) flushes.
 *
 * The guest is the attacker: every header field is checked (CIDs, type, length against the chain
 * and 64 KiB, op against the connection's state); bad packets get an RST or are dropped, never a
 * throw. Packets for the host are only ever written into rx chains' writable buffers.
 */
export class VsockDevice implements VirtioDevice {
  readonly deviceType = VIRTIO_ID.VSOCK;
  readonly queueMaxSizes: readonly number[] = [QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE];
  readonly features = featureBit(VIRTIO_F.VERSION_1) | featureBit(VIRTIO_F.INDIRECT_DESC) | featureBit(VIRTIO_F.EVENT_IDX);
  readonly configSize = VSOCK_CONFIG_SIZE;
  readonly guestCid: number;
  readonly udsPath: string;
  readonly maxConnections: number;
  /** The listening socket at udsPath (-1 after close()). */
  listenFd: number;
  /** The writability epoll (see the class comment). */
  readonly epollFd: number;

  private ctx: ActivateContext | undefined;
  private queues: (SplitQueue | undefined)[] = [];
  /** An rx chain popped but not used yet (the stream had nothing after all, say). */
  private heldRx: DescriptorChain | undefined;
  private readonly byFd = new Map<number, Conn>();
  /** Connections with a guest side, by `${localPort}:${peerPort}`. */
  private readonly byTuple = new Map<string, Conn>();
  /** How many connections use each local port (ephemeral ports are picked unused). */
  private readonly localPortUse = new Map<number, number>();
  private nextEphemeral = VSOCK_FIRST_EPHEMERAL_PORT;
  private ctl: Ctl[] = [];
  private txDeferred = false;
  private watchingCount = 0;
  private acceptBackoffUntil = 0;
  private nextExpiryCheck = 0;
  private readonly hdrBuf = new Uint8Array(VSOCK_HDR_LEN);
  private readonly rxBuf = new Uint8Array(VSOCK_MAX_PAYLOAD);
  private readonly counters = { hostConnections: 0, guestConnections: 0, guestRefused: 0, txInvalid: 0, bytesToGuest: 0, bytesFromGuest: 0 };

  /**
   * Binds and listens on `udsPath` (a stale socket file nobody listens on is replaced).
   * @throws TypevisorError VSOCK_CID, VSOCK_UDS, UNIX_SOCKET
   */
  constructor(opts: VsockDeviceOptions) {
    const cid = opts.guestCid;
    if (!Number.isInteger(cid) || cid < 3 || cid > 0xfffffffe) {
      throw new TypevisorError("VSOCK_CID", `vsock guest CID ${String(cid)} is not in 3..4294967294 (0-2 are reserved: hypervisor, local, host; 0xffffffff means any)`);
    }
    const problem = unixPathProblem(opts.udsPath);
    if (problem !== undefined) throw new TypevisorError("VSOCK_UDS", `vsock socket path ${JSON.stringify(opts.udsPath)} ${problem}`);
    // Guest-initiated connections go to `${udsPath}_${port}`: leave room for "_4294967295".
    if (Buffer.byteLength(opts.udsPath, "utf8") + 11 > UNIX_PATH_MAX) {
      throw new TypevisorError("VSOCK_UDS", `vsock socket path ${JSON.stringify(opts.udsPath)} is too long: with "_<port>" appended it must fit ${UNIX_PATH_MAX} bytes`, {
        hint: "use a shorter (e.g. relative or /run/...) path",
      });
    }
    const max = opts.maxConnections ?? VSOCK_MAX_CONNECTIONS;
    if (!Number.isInteger(max) || max < 1 || max > 65536) throw new TypevisorError("VSOCK_OPTIONS", `vsock maxConnections ${max} is not in 1..65536`);
    this.maxConnections = max;
    this.guestCid = cid;
    this.udsPath = opts.udsPath;
    removeStaleSocket(opts.udsPath);
    this.listenFd = unixListen(opts.udsPath);
    try {
      this.epollFd = epollCreate();
    } catch (e) {
      closeFd(this.listenFd);
      unlinkPath(opts.udsPath);
      throw e;
    }
  }

  readConfig(offset: number, size: number): bigint {
    if (![1, 2, 4, 8].includes(size) || !Number.isInteger(offset) || offset < 0 || offset + size > VSOCK_CONFIG_SIZE) return 0n;
    return (BigInt(this.guestCid) >> BigInt(8 * offset)) & ((1n << BigInt(8 * size)) - 1n);
  }

  /** guest_cid is read-only for the driver (virtio 1.2 §5.10.4). */
  writeConfig(_offset: number, _size: number, _value: bigint): void {}

  activate(ctx: ActivateContext): void {
    this.closeAll(false);
    this.ctx = ctx;
    this.queues = activateQueues(ctx, this.queueMaxSizes);
  }

  /**
   * Resume after a snapshot: queues from their cursors, no connections (they were not saved), and
   * a TRANSPORT_RESET event so the guest drops the ones it still believes in (§5.10.6.6).
   */
  restore(ctx: ActivateContext, state: VsockDeviceState): void {
    if (state.version !== 1) throw new TypevisorError("SNAPSHOT_VERSION", `virtio-vsock state version ${String(state.version)} is not supported`);
    this.closeAll(false);
    if (!state.activated) return;
    this.ctx = ctx;
    this.queues = activateQueues(ctx, this.queueMaxSizes, state.queues);
    this.sendTransportReset();
  }

  /** The listener, the writability epoll and every connection's stream (asked anew each poll pass). */
  get backendFds(): readonly number[] {
    const fds: number[] = [];
    if (this.listenFd >= 0) fds.push(this.listenFd, this.epollFd);
    for (const fd of this.byFd.keys()) fds.push(fd);
    return fds;
  }

  backendWanted(fd: number): boolean {
    if (fd === this.listenFd) return fd >= 0 && Date.now() >= this.acceptBackoffUntil;
    if (fd === this.epollFd) return this.watchingCount > 0;
    const conn = this.byFd.get(fd);
    if (conn === undefined) return false;
    if (conn.state === "await-connect") return true;
    // While we wait for RESPONSE the client should not be sending; its bytes stay in the socket.
    if (conn.state === "requesting") return false;
    return this.canSendData(conn);
  }

  onBackendReadable(fd: number): void {
    try {
      this.expireRequests();
      if (fd === this.listenFd) this.acceptClients();
      else if (fd === this.epollFd) this.flushWritable();
      else {
        const conn = this.byFd.get(fd);
        if (conn?.state === "await-connect") this.readConnectLine(conn);
        else if (conn?.state === "established") this.streamToGuest(conn);
      }
      this.flushCtl();
    } catch (e) {
      this.internalError(e);
    } finally {
      this.raiseRx();
    }
  }

  notify(q: number): void {
    const ctx = this.ctx;
    if (ctx === undefined) return;
    try {
      this.expireRequests();
      if (q === VSOCK_TXQ) this.serviceTx(ctx);
      else if (q === VSOCK_RXQ) {
        // New rx buffers: replies first, then tx we held back for them. Stream data follows on
        // the next poll pass (backendWanted turns true again).
        this.flushCtl();
        if (this.txDeferred) this.serviceTx(ctx);
      }
      // Event queue: the driver only stocks it; we use one buffer per TRANSPORT_RESET (restore).
      this.flushCtl();
    } catch (e) {
      this.internalError(e);
    } finally {
      this.raiseRx();
    }
  }

  /** Device reset: every connection is closed (the guest's sockets are gone); the listener stays. */
  /** Where the queues stand (GET /threads). */
  inspect(): VirtioDeviceInspect {
    return { queues: inspectQueues(this.queues, this.queueMaxSizes.length) };
  }

  reset(): void {
    this.closeAll(false);
    this.ctx = undefined;
    this.queues = [];
  }

  /** Tear down for good: connections, listener, epoll, and the socket file. Idempotent. */
  close(): void {
    this.reset();
    if (this.listenFd >= 0) {
      closeFd(this.listenFd);
      closeFd(this.epollFd);
      unlinkPath(this.udsPath);
      this.listenFd = -1;
    }
  }

  save(): VsockDeviceState {
    return {
      version: 1,
      guestCid: this.guestCid,
      udsPath: this.udsPath,
      features: (this.ctx?.features ?? 0n).toString(16),
      activated: this.ctx !== undefined,
      queues: this.queues.map((q, i) => {
        const st = q?.save() ?? null;
        if (st !== null && i === VSOCK_RXQ && this.heldRx !== undefined) st.nextAvail = (st.nextAvail - 1) & 0xffff;
        return st;
      }),
      openConnections: this.byFd.size,
    };
  }

  stats(): VsockStats {
    return { ...this.counters, open: this.byFd.size };
  }

  // ---- guest -> host (tx queue) ------------------------------------------------------------

  private serviceTx(ctx: ActivateContext): void {
    if (this.ctl.length >= CTL_SOFT_LIMIT) {
      this.txDeferred = true;
      return;
    }
    this.txDeferred = false;
    serviceQueue(ctx, VSOCK_TXQ, this.queues[VSOCK_TXQ], (chain) => {
      this.handleTx(ctx, chain);
      // Keep going while replies can be queued; the rest waits for rx buffers (notify(RXQ)).
      if (this.ctl.length >= CTL_SOFT_LIMIT) this.flushCtl();
      return 0;
    });
  }

  /** One guest packet (virtio 1.2 §5.10.6): header + payload in the readable part; used len 0. */
  private handleTx(ctx: ActivateContext, chain: DescriptorChain): void {
    if (chain.totalRead < VSOCK_HDR_LEN) {
      this.counters.txInvalid++;
      return;
    }
    const h = decodeHeader(readChain(ctx.mem, chain.readable, 0, VSOCK_HDR_LEN));
    // Spoofed or misaddressed: nobody to answer (an RST would go to a CID that is not there).
    if (h.srcCid !== BigInt(this.guestCid) || h.dstCid !== BigInt(VSOCK_HOST_CID)) {
      this.counters.txInvalid++;
      return;
    }
    const conn = this.byTuple.get(`${h.dstPort}:${h.srcPort}`);
    const bad = (): void => {
      this.counters.txInvalid++;
      if (conn !== undefined) this.closeConn(conn, true);
      else if (h.op !== VSOCK_OP.RST) this.queueOrphanRst(h);
    };
    // §5.10.6: len counts payload after the header; it must be in the chain, and ≤ 64 KiB.
    if (h.len > VSOCK_MAX_PAYLOAD || h.len > chain.totalRead - VSOCK_HDR_LEN) return bad();
    if (h.type !== VSOCK_TYPE_STREAM) return bad();

    if (h.op === VSOCK_OP.REQUEST) {
      if (conn !== undefined) return bad(); // the tuple is in use: the guest is confused; reset both
      this.guestConnect(h);
      return;
    }
    if (conn === undefined) {
      if (h.op !== VSOCK_OP.RST) this.queueOrphanRst(h);
      return;
    }
    if (h.op === VSOCK_OP.RST) {
      this.closeConn(conn, false);
      return;
    }
    if (conn.state === "requesting") {
      if (h.op !== VSOCK_OP.RESPONSE) return bad();
      this.updateCredit(conn, h);
      this.established(conn);
      return;
    }
    // established
    this.updateCredit(conn, h);
    switch (h.op) {
      case VSOCK_OP.RW:
        this.guestData(ctx, conn, chain, h.len);
        return;
      case VSOCK_OP.CREDIT_UPDATE:
        return;
      case VSOCK_OP.CREDIT_REQUEST:
        this.queueCreditUpdate(conn);
        return;
      case VSOCK_OP.SHUTDOWN:
        if ((h.flags & VSOCK_SHUTDOWN_RCV) !== 0) conn.guestNoRecv = true;
        if ((h.flags & VSOCK_SHUTDOWN_SEND) !== 0) conn.guestNoSend = true;
        this.maybeFinish(conn);
        return;
      default:
        // RESPONSE on an established connection, or an op the spec does not define.
        return bad();
    }
  }

  /** Every guest packet carries its receive state (§5.10.6.3); stale or bogus values only cost the guest. */
  private updateCredit(conn: Conn, h: VsockHeader): void {
    conn.peerBufAlloc = h.bufAlloc;
    conn.peerFwdCnt = h.fwdCnt;
  }

  private guestConnect(h: VsockHeader): void {
    if (this.byFd.size >= this.maxConnections) {
      this.counters.guestRefused++;
      this.queueOrphanRst(h);
      return;
    }
    const fd = unixConnect(`${this.udsPath}_${h.dstPort}`);
    if (fd < 0) {
      this.counters.guestRefused++;
      this.queueOrphanRst(h);
      return;
    }
    const conn = this.newConn(fd, "established");
    conn.localPort = h.dstPort;
    conn.peerPort = h.srcPort;
    this.updateCredit(conn, h);
    this.addTuple(conn);
    this.counters.guestConnections++;
    this.queue({ op: VSOCK_OP.RESPONSE, localPort: conn.localPort, peerPort: conn.peerPort, flags: 0, conn });
  }

  private established(conn: Conn): void {
    // Firecracker's protocol: the host client learns its local port from "OK <port>\n". The stream
    // is fresh and empty, so a short write means it is already broken.
    const ok = Buffer.from(`OK ${conn.localPort}\n`);
    if (writeRaw(conn.fd, ok) !== ok.length) {
      this.closeConn(conn, true);
      return;
    }
    conn.state = "established";
  }

  /** RW payload: straight to the stream; what it will not take waits, within our credit. */
  private guestData(ctx: ActivateContext, conn: Conn, chain: DescriptorChain, len: number): void {
    if (len === 0) return;
    // §5.10.6.3.1: the guest may not send beyond our free space, nor after its SEND shutdown.
    if (conn.guestNoSend || conn.outBytes + len > VSOCK_BUF_ALLOC) {
      this.counters.txInvalid++;
      this.closeConn(conn, true);
      return;
    }
    conn.rxCnt = u32(conn.rxCnt + len);
    this.counters.bytesFromGuest += len;
    let views = chainSlices(ctx.mem, chain.readable, VSOCK_HDR_LEN, len);
    if (views.length > 64) views = [Buffer.concat(views)];
    let done = 0;
    if (conn.outBytes === 0) {
      const r = writevRaw(conn.fd, views);
      if (r < 0 && r !== -EAGAIN && r !== -EINTR) {
        this.closeConn(conn, true);
        return;
      }
      done = Math.max(0, r);
      conn.fwdCnt = u32(conn.fwdCnt + done);
    }
    if (done < len) {
      // Copy the rest out of guest memory: the chain goes back to the guest now.
      const rest = new Uint8Array(len - done);
      let off = 0;
      let skip = done;
      for (const v of views) {
        if (skip >= v.length) {
          skip -= v.length;
          continue;
        }
        rest.set(v.subarray(skip), off);
        off += v.length - skip;
        skip = 0;
      }
      conn.out.push(rest);
      conn.outBytes += rest.length;
      this.watch(conn, true);
    }
    this.maybeCreditUpdate(conn);
  }

  // ---- host side ---------------------------------------------------------------------------

  private acceptClients(): void {
    for (let i = 0; i < ACCEPT_BATCH; i++) {
      const fd = unixAccept(this.listenFd);
      if (fd === -EINTR) continue;
      if (fd === -24 || fd === -23) {
        // EMFILE/ENFILE: the client stays in the backlog; leave the listener out of poll a while.
        this.acceptBackoffUntil = Date.now() + ACCEPT_BACKOFF_MS;
        return;
      }
      if (fd < 0) return;
      if (this.ctx === undefined || this.byFd.size >= this.maxConnections) {
        // No driver, or the table is full: the client sees EOF instead of hanging.
        closeFd(fd);
        continue;
      }
      this.newConn(fd, "await-connect");
      this.counters.hostConnections++;
    }
  }

  /** "CONNECT <port>\n", read a byte at a time so nothing the client sends after it is taken early. */
  private readConnectLine(conn: Conn): void {
    const b = this.hdrBuf.subarray(0, 1);
    for (;;) {
      const r = readRaw(conn.fd, b);
      if (r === -EINTR) continue;
      if (r === -EAGAIN) return;
      if (r <= 0) {
        this.closeConn(conn, false);
        return;
      }
      if (b[0] !== 0x0a) {
        conn.line.push(b[0]!);
        if (conn.line.length > MAX_CONNECT_LINE) this.closeConn(conn, false);
        if (conn.closed) return;
        continue;
      }
      const m = /^CONNECT ([0-9]{1,10})$/.exec(Buffer.from(conn.line).toString("latin1"));
      const port = m === null ? NaN : Number(m[1]);
      if (!(port <= 0xffffffff) || this.ctx === undefined) {
        this.closeConn(conn, false);
        return;
      }
      conn.line = [];
      conn.peerPort = port;
      conn.localPort = this.allocatePort();
      conn.state = "requesting";
      conn.requestedAt = Date.now();
      this.addTuple(conn);
      this.queue({ op: VSOCK_OP.REQUEST, localPort: conn.localPort, peerPort: port, flags: 0, conn });
      return;
    }
  }

  private allocatePort(): number {
    for (;;) {
      const p = this.nextEphemeral;
      this.nextEphemeral = p >= 0xfffffffe ? VSOCK_FIRST_EPHEMERAL_PORT : p + 1;
      // At most VSOCK_MAX_CONNECTIONS ports are in use, so this ends quickly.
      if (!this.localPortUse.has(p)) return p;
    }
  }

  /** Unix stream -> guest: RW packets within the guest's credit and rx buffers. */
  private streamToGuest(conn: Conn): void {
    const ctx = this.ctx;
    const q = this.queues[VSOCK_RXQ];
    if (ctx === undefined || q === undefined) return;
    for (let n = 0; n < RX_BATCH && !conn.closed; n++) {
      this.flushCtl();
      if (!this.canSendData(conn)) return;
      const chain = this.takeRx(VSOCK_HDR_LEN + 1);
      if (chain === undefined) return;
      const cap = Math.min(chain.totalWrite - VSOCK_HDR_LEN, this.peerFree(conn), VSOCK_MAX_PAYLOAD);
      const r = readRaw(conn.fd, this.rxBuf.subarray(0, cap));
      if (r === -EINTR) continue;
      if (r === -EAGAIN) return;
      if (r < 0) {
        this.closeConn(conn, true);
        return;
      }
      if (r === 0) {
        // EOF: the host will send no more (it may still read: unix streams half-close).
        conn.hostEof = true;
        this.queue({ op: VSOCK_OP.SHUTDOWN, localPort: conn.localPort, peerPort: conn.peerPort, flags: VSOCK_SHUTDOWN_SEND, conn });
        this.maybeFinish(conn);
        return;
      }
      this.heldRx = undefined;
      this.writePacket(ctx, q, chain, VSOCK_OP.RW, conn.localPort, conn.peerPort, 0, conn, this.rxBuf.subarray(0, r));
      conn.txCnt = u32(conn.txCnt + r);
      this.counters.bytesToGuest += r;
    }
  }

  /** The epoll fd is readable: some streams with buffered guest data can take more. */
  private flushWritable(): void {
    for (const ev of epollReady(this.epollFd, 128)) {
      const conn = this.byFd.get(ev.fd);
      if (conn === undefined) {
        epollCtl(this.epollFd, EPOLL_CTL_DEL, ev.fd, 0);
        continue;
      }
      this.flush(conn);
    }
  }

  private flush(conn: Conn): void {
    while (conn.out.length > 0) {
      const head = conn.out[0]!;
      const r = writeRaw(conn.fd, head);
      if (r === -EINTR) continue;
      if (r === -EAGAIN) break;
      if (r < 0) {
        this.closeConn(conn, true);
        return;
      }
      conn.outBytes -= r;
      conn.fwdCnt = u32(conn.fwdCnt + r);
      if (r === head.length) conn.out.shift();
      else conn.out[0] = head.subarray(r);
    }
    if (conn.out.length === 0) this.watch(conn, false);
    this.maybeCreditUpdate(conn);
    this.maybeFinish(conn);
  }

  private watch(conn: Conn, on: boolean): void {
    if (conn.watching === on) return;
    const r = epollCtl(this.epollFd, on ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, conn.fd, EPOLLOUT);
    if (on && r < 0) {
      // Cannot wait for writability: drop the connection rather than stall it forever.
      this.closeConn(conn, true);
      return;
    }
    conn.watching = on;
    this.watchingCount += on ? 1 : -1;
  }

  /**
   * Tell the guest about freed space (§5.10.6.3) when a good part of the buffer came free, or
   * when its view of our free space is under one packet (else it may stall waiting for us).
   */
  private maybeCreditUpdate(conn: Conn): void {
    if (conn.closed) return;
    const freed = u32(conn.fwdCnt - conn.fwdCntSent);
    if (freed === 0) return;
    const guestView = VSOCK_BUF_ALLOC - u32(conn.rxCnt - conn.fwdCntSent);
    if (freed >= CREDIT_UPDATE_THRESHOLD || guestView < VSOCK_MAX_PAYLOAD) this.queueCreditUpdate(conn);
  }

  private queueCreditUpdate(conn: Conn): void {
    if (conn.creditQueued) return;
    conn.creditQueued = true;
    this.queue({ op: VSOCK_OP.CREDIT_UPDATE, localPort: conn.localPort, peerPort: conn.peerPort, flags: 0, conn });
  }

  /** Close once both directions are done; pass on the guest's SEND shutdown once its data is out. */
  private maybeFinish(conn: Conn): void {
    if (conn.closed || conn.state !== "established") return;
    if (conn.guestNoSend && conn.outBytes === 0 && !conn.wrShut) {
      shutdownSocket(conn.fd, SHUT_WR);
      conn.wrShut = true;
    }
    // §5.10.6.5: a peer that has both shut down gets an RST; so does a connection whose
    // directions have both ended (host EOF, guest SEND shutdown drained).
    if ((conn.guestNoSend && conn.guestNoRecv && conn.outBytes === 0) || (conn.hostEof && conn.guestNoSend && conn.outBytes === 0)) {
      this.closeConn(conn, true);
    }
  }

  private expireRequests(): void {
    // At most a few times a second: this runs on every event, data path included.
    const now = Date.now();
    if (now < this.nextExpiryCheck) return;
    this.nextExpiryCheck = now + 250;
    for (const conn of this.byFd.values()) {
      if (conn.state !== "established" && now - conn.requestedAt > VSOCK_REQUEST_TIMEOUT_MS) this.closeConn(conn, conn.state === "requesting");
    }
  }

  // ---- connections -------------------------------------------------------------------------

  private newConn(fd: number, state: ConnState): Conn {
    const conn: Conn = {
      fd,
      state,
      localPort: 0,
      peerPort: 0,
      line: [],
      requestedAt: Date.now(),
      peerBufAlloc: 0,
      peerFwdCnt: 0,
      txCnt: 0,
      rxCnt: 0,
      fwdCnt: 0,
      fwdCntSent: 0,
      out: [],
      outBytes: 0,
      watching: false,
      hostEof: false,
      guestNoRecv: false,
      guestNoSend: false,
      wrShut: false,
      creditQueued: false,
      closed: false,
    };
    this.byFd.set(fd, conn);
    return conn;
  }

  private addTuple(conn: Conn): void {
    this.byTuple.set(`${conn.localPort}:${conn.peerPort}`, conn);
    this.localPortUse.set(conn.localPort, (this.localPortUse.get(conn.localPort) ?? 0) + 1);
  }

  /** Close the stream and forget the connection; `rst` tells the guest (if it knows the connection). */
  private closeConn(conn: Conn, rst: boolean): void {
    if (conn.closed) return;
    conn.closed = true;
    if (conn.watching) {
      epollCtl(this.epollFd, EPOLL_CTL_DEL, conn.fd, 0);
      this.watchingCount--;
      conn.watching = false;
    }
    this.byFd.delete(conn.fd);
    closeFd(conn.fd);
    conn.out = [];
    conn.outBytes = 0;
    if (conn.state === "await-connect") return;
    const key = `${conn.localPort}:${conn.peerPort}`;
    if (this.byTuple.get(key) === conn) this.byTuple.delete(key);
    const use = (this.localPortUse.get(conn.localPort) ?? 1) - 1;
    if (use > 0) this.localPortUse.set(conn.localPort, use);
    else this.localPortUse.delete(conn.localPort);
    if (rst) this.queue({ op: VSOCK_OP.RST, localPort: conn.localPort, peerPort: conn.peerPort, flags: 0, conn: undefined });
  }

  private closeAll(rst: boolean): void {
    for (const conn of [...this.byFd.values()]) this.closeConn(conn, rst);
    this.ctl = [];
    this.txDeferred = false;
    this.heldRx = undefined;
  }

  // ---- host -> guest (rx queue) ------------------------------------------------------------

  private canSendData(conn: Conn): boolean {
    if (conn.closed || conn.state !== "established" || conn.hostEof || conn.guestNoRecv) return false;
    if (this.ctx === undefined || this.ctl.length > 0 || this.peerFree(conn) === 0) return false;
    return this.rxAvailable();
  }

  /** peer_free = peer_buf_alloc - (tx_cnt - peer_fwd_cnt) (virtio 1.2 §5.10.6.3), never negative. */
  private peerFree(conn: Conn): number {
    const inFlight = u32(conn.txCnt - conn.peerFwdCnt);
    return inFlight >= conn.peerBufAlloc ? 0 : conn.peerBufAlloc - inFlight;
  }

  /** Whether an rx buffer is there (arming the driver's notification when not, §2.7.10). */
  private rxAvailable(): boolean {
    if (this.heldRx !== undefined) return true;
    const q = this.queues[VSOCK_RXQ];
    if (q === undefined || q.broken !== undefined) return false;
    const n = q.pending();
    if (typeof n !== "number") return false;
    return n > 0 || q.armNotification();
  }

  /**
   * The next rx chain with at least `min` writable bytes. Chains too small for any packet
   * are handed back empty (the guest's mistake; Linux posts 4 KiB + header).
   */
  private takeRx(min: number): DescriptorChain | undefined {
    const ctx = this.ctx;
    const q = this.queues[VSOCK_RXQ];
    if (ctx === undefined || q === undefined || q.broken !== undefined) return undefined;
    for (;;) {
      let c = this.heldRx;
      if (c === undefined) {
        const p = q.pop();
        if (p instanceof QueueError) {
          ctx.needsReset(`queue ${VSOCK_RXQ}: ${p.message}`);
          return undefined;
        }
        if (p === undefined) {
          if (q.armNotification()) continue;
          return undefined;
        }
        c = p;
        this.heldRx = c;
      }
      if (c.totalWrite >= min) return c;
      this.heldRx = undefined;
      q.pushUsed(c.head, 0);
    }
  }

  private queue(item: Ctl): void {
    if (item.conn === undefined && this.ctl.length >= CTL_HARD_LIMIT) return;
    this.ctl.push(item);
  }

  private queueOrphanRst(h: VsockHeader): void {
    // Reply to the sender's tuple: from the port it addressed, to the port it came from.
    this.queue({ op: VSOCK_OP.RST, localPort: h.dstPort, peerPort: h.srcPort, flags: 0, conn: undefined });
  }

  /** Send queued control packets while rx buffers last. */
  private flushCtl(): void {
    const ctx = this.ctx;
    const q = this.queues[VSOCK_RXQ];
    if (ctx === undefined || q === undefined) return;
    let i = 0;
    while (i < this.ctl.length) {
      const item = this.ctl[i]!;
      if (item.conn?.closed === true) {
        i++;
        continue;
      }
      const chain = this.takeRx(VSOCK_HDR_LEN);
      if (chain === undefined) break;
      this.heldRx = undefined;
      if (item.op === VSOCK_OP.CREDIT_UPDATE && item.conn !== undefined) item.conn.creditQueued = false;
      this.writePacket(ctx, q, chain, item.op, item.localPort, item.peerPort, item.flags, item.conn, undefined);
      i++;
    }
    this.ctl = i === this.ctl.length ? [] : this.ctl.slice(i);
  }

  private writePacket(ctx: ActivateContext, q: SplitQueue, chain: DescriptorChain, op: number, localPort: number, peerPort: number, flags: number, conn: Conn | undefined, payload: Uint8Array | undefined): void {
    const len = payload?.length ?? 0;
    encodeHeader(
      {
        srcCid: BigInt(VSOCK_HOST_CID),
        dstCid: BigInt(this.guestCid),
        srcPort: localPort,
        dstPort: peerPort,
        len,
        type: VSOCK_TYPE_STREAM,
        op,
        flags,
        bufAlloc: conn !== undefined ? VSOCK_BUF_ALLOC : 0,
        fwdCnt: conn?.fwdCnt ?? 0,
      },
      this.hdrBuf,
    );
    // Every packet tells the guest our fwd_cnt, so it counts as a credit update (§5.10.6.3).
    if (conn !== undefined) conn.fwdCntSent = conn.fwdCnt;
    writeChain(ctx.mem, chain.writable, this.hdrBuf);
    if (payload !== undefined) writeChain(ctx.mem, chain.writable, payload, VSOCK_HDR_LEN);
    q.pushUsed(chain.head, VSOCK_HDR_LEN + len);
  }

  private sendTransportReset(): void {
    const ctx = this.ctx;
    const q = this.queues[VSOCK_EVQ];
    if (ctx === undefined || q === undefined) return;
    try {
      const c = q.pop();
      if (c instanceof QueueError) {
        ctx.needsReset(`queue ${VSOCK_EVQ}: ${c.message}`);
        return;
      }
      if (c === undefined) return; // the driver stocked no event buffer: nothing we can tell it
      const ev = new Uint8Array(4);
      new DataView(ev.buffer).setUint32(0, VSOCK_EVENT_TRANSPORT_RESET, true);
      q.pushUsed(c.head, writeChain(ctx.mem, c.writable, ev));
      if (q.needsInterrupt()) ctx.interruptQueue(VSOCK_EVQ);
    } catch (e) {
      this.internalError(e);
    }
  }

  private raiseRx(): void {
    const ctx = this.ctx;
    const q = this.queues[VSOCK_RXQ];
    if (ctx === undefined || q === undefined) return;
    try {
      if (q.needsInterrupt()) ctx.interruptQueue(VSOCK_RXQ);
    } catch {
      // needsInterrupt reads validated ring addresses; nothing sensible to do if that fails.
    }
  }

  /** Chains are validated, so this is a bug or memory changing under us: fail the rx queue, not the VMM. */
  private internalError(e: unknown): void {
    const q = this.queues[VSOCK_RXQ];
    const msg = e instanceof Error ? e.message : String(e);
    if (q !== undefined) q.poison(new QueueError("VIRTQ_INTERNAL", msg));
    this.ctx?.needsReset(`virtio-vsock: ${msg}`);
    this.closeAll(false);
  }
}

/**
 * A socket file left by a VMM that died is in the way of bind(2). Replace it only when nobody
 * listens there (connect refused); a live socket means another VM uses the path.
 * @throws TypevisorError VSOCK_UDS
 */
function removeStaleSocket(path: string): void {
  let isSocket: boolean;
  try {
    isSocket = lstatSync(path).isSocket();
  } catch {
    return; // absent (or unreadable: bind will say why)
  }
  if (!isSocket) throw new TypevisorError("VSOCK_UDS", `vsock socket path ${path} exists and is not a socket`, { hint: "choose another path" });
  const fd = unixConnect(path);
  if (fd >= 0) {
    closeFd(fd);
    throw new TypevisorError("VSOCK_UDS", `vsock socket path ${path} is in use (something is listening there)`, { hint: "another VM may use it; choose another path" });
  }
  if (fd === -ECONNREFUSED) unlinkPath(path);
}
