/**
 * The live-migration stream: frames over one TCP or unix-socket connection.
 *
 *   frame = type u32 LE | length u32 LE | payload (length bytes, at most MAX_FRAME)
 *
 * Source to destination, in order: HELLO (JSON: version, the machine's configuration, its RAM
 * regions), then any number of PAGES (u64 guest-physical address, then whole 4 KiB pages) and
 * PAGE_SET (u64 address of a window of SET_PAGES pages, a bitmap of its pages that follow with
 * their bytes, a bitmap of its pages that became zero, then the bytes of the first bitmap's pages
 * in order: the rounds after the first, whose dirty pages lie scattered, in one frame per window
 * where a frame per run cost both sides more than the bytes did) and, when the disks are copied,
 * DISK_DATA (u32 disk index, u32 zero, u64 byte offset, then the bytes), then STATE (a snapshot state file,
 * checksummed and schema-checked as one: snapshot/state.ts), then DONE. Meanwhile the
 * destination says PREPARED once its device and vCPU threads are up (the source switches over
 * only after it, so their start-up is never part of the guest's pause). The destination answers
 * READY once the whole state is in place (or ERROR with a message); the source then commits and
 * sends GO; the destination runs the VM and answers RUNNING (JSON: its timings, reported only).
 * Just before it pauses the guest, the source sends SYNC (u32 sequence) and waits for the
 * destination's SYNCED (the same payload), which the destination sends when it has read every
 * frame before the SYNC: the pause then starts with nothing of the earlier rounds in flight (the
 * socket buffers held megabytes of them, which the last round waited behind inside the pause).
 *
 * Everything a destination reads is hostile: every length is capped before anything is
 * allocated, every page range is checked against the VM's RAM regions, frames out of order are
 * refused, and any violation ends the migration with MIGRATION_STREAM and no VM.
 */
import type { Socket } from "node:net";
import { TypevisorError } from "../../errors.js";
import type { SnapshotConfig, SnapshotState } from "../snapshot/state.js";

/** 2: PREPARED, RUNNING's timings. 3: SYNC and SYNCED before the pause. 4: PAGE_SET in place of ZEROS. */
export const MIGRATION_VERSION = 4;
export const PAGE = 4096;
/** 2 MiB of pages and their header: the largest frame either side accepts (the state is sent in pieces). */
export const MAX_FRAME = 2 * 1024 * 1024 + 64;
/** A snapshot state file may be up to this large (MAX_STATE_BYTES is the file cap; a stream VM is smaller). */
export const MAX_STATE_STREAM = 64 * 1024 * 1024;
/** The source sends the state in STATE frames of this many bytes (the last one shorter). */
export const STATE_PIECE = MAX_FRAME - 64;
/**
 * At most this many STATE frames: twice what MAX_STATE_STREAM takes in STATE_PIECE frames. The
 * destination keeps every piece until DONE; pieces of a byte each would cost it an object (and,
 * as views of the socket's reads, a whole read) per byte it was sent.
 */
export const MAX_STATE_FRAMES = 2 * Math.ceil(MAX_STATE_STREAM / STATE_PIECE);

/** The largest disk a stream may copy (a sanity cap: 1 PiB). */
export const MAX_DISK_BYTES = 2 ** 50;

export const FRAME = {
  HELLO: 1, PAGES: 2, STATE: 4, DONE: 5, DISK_DATA: 6, SYNC: 7, PAGE_SET: 8,
  READY: 16, GO: 17, RUNNING: 18, ERROR: 19, PREPARED: 20, SYNCED: 21,
} as const;
export type FrameType = (typeof FRAME)[keyof typeof FRAME];
const NAMES = Object.fromEntries(Object.entries(FRAME).map(([k, v]) => [v, k])) as Record<number, string>;

/** HELLO: the VM's configuration and RAM layout (hello-schema.ts checks it on the destination; the source loads no zod). */
export interface Hello {
  magic: "typevisor-migration";
  version: number;
  config: SnapshotConfig;
  regions: { guestPhysAddr: number; size: number }[];
  /**
   * "disks": "copy": each disk's size (what the guest sees) and format, in the configuration's
   * order; its contents come as DISK_DATA. The destination makes its copy in that format (a
   * qcow2 copy standalone: the data of the source's whole backing chain, no backing file).
   */
  disks?: { size: number; format?: "raw" | "qcow2" }[];
}

export function hello(config: SnapshotConfig, regions: { guestPhysAddr: number; size: number }[], disks?: { size: number; format?: "raw" | "qcow2" }[]): Hello {
  return { magic: "typevisor-migration", version: MIGRATION_VERSION, config, regions, ...(disks !== undefined ? { disks } : {}) };
}

/** DISK_DATA's header: u32 disk index, u32 zero, u64 byte offset; the bytes follow. */
export const DISK_HEADER = 16;
/** Bytes of disk per DISK_DATA frame at most. */
export const DISK_CHUNK = 1024 * 1024;

export function diskHeader(disk: number, offset: number): Buffer {
  const b = Buffer.alloc(DISK_HEADER);
  b.writeUInt32LE(disk, 0);
  b.writeBigUInt64LE(BigInt(offset), 8);
  return b;
}

export const streamError = (detail: string): TypevisorError => new TypevisorError("MIGRATION_STREAM", `migration stream: ${detail}`);

/** One frame's bytes: header and payload parts, written with one writev-like call by the socket. */
export function frame(type: FrameType, ...parts: Uint8Array[]): Uint8Array[] {
  const length = parts.reduce((n, p) => n + p.length, 0);
  if (length > MAX_FRAME) throw new TypevisorError("MIGRATION", `a ${NAMES[type]} frame of ${length} bytes is over the ${MAX_FRAME}-byte limit`);
  const h = Buffer.alloc(8);
  h.writeUInt32LE(type, 0);
  h.writeUInt32LE(length, 4);
  return [h, ...parts];
}

export function jsonFrame(type: FrameType, value: unknown): Uint8Array[] {
  return frame(type, Buffer.from(JSON.stringify(value)));
}

export function pagesHeader(gpa: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(gpa), 0);
  return b;
}

/**
 * Where a PAGE_SET's data goes: its pages' addresses in order, each run of adjacent ones as one
 * view (`view(gpa, max)`: a writable view of at most max bytes). The reader asks for offsets in
 * order (DirectFrames), so a cursor finds the run.
 */
export function pageSetTarget(data: readonly number[], view: (gpa: number, max: number) => Uint8Array): FrameTarget {
  let i = 0;
  return (at, max) => {
    while (i < data.length && at >= (i + 1) * PAGE) i++;
    const k = Math.floor(at / PAGE);
    if (k !== i) throw streamError(`PAGE_SET data out of order (byte ${at})`);
    // The run of adjacent pages from page i on.
    let j = i + 1;
    while (j < data.length && data[j] === data[j - 1]! + PAGE) j++;
    return view(data[i]! + (at - i * PAGE), Math.min(max, j * PAGE - at));
  };
}

/** Pages in a PAGE_SET window (1 MiB: a full window and its head fit in MAX_FRAME). */
export const SET_PAGES = 256;
/** One PAGE_SET bitmap's bytes (bit k of byte k >> 3, least significant first: the window's page k). */
export const SET_BITMAP = SET_PAGES / 8;
/** PAGE_SET's head: the window's u64 address, the data bitmap, the zero bitmap. */
export const SET_HEAD = 8 + 2 * SET_BITMAP;
/** A whole PAGE_SET frame at its largest: frame header, head, every page of the window. */
const SET_FRAME_MAX = 8 + SET_HEAD + SET_PAGES * PAGE;

/** A PAGE_SET head for the window at `gpa`, its bitmaps empty (setPageBit fills them). */
export function pageSetHead(gpa: number): Buffer {
  const b = Buffer.alloc(SET_HEAD);
  b.writeBigUInt64LE(BigInt(gpa), 0);
  return b;
}

/** Mark the window's page `k` in a PAGE_SET head: its bytes follow (`zero` false), or it became zero. */
export function setPageBit(head: Buffer, k: number, zero: boolean): void {
  head[8 + (zero ? SET_BITMAP : 0) + (k >> 3)]! |= 1 << (k & 7);
}

/**
 * A PAGE_SET head read and checked against the frame's length and guest RAM (`inRam(gpa, len)`):
 * the guest-physical address of every page whose bytes follow, in order, and of every page that
 * became zero. Refused (MIGRATION_STREAM): an address that is not page-aligned, a page in both
 * bitmaps, a page outside guest RAM, a data bitmap whose pages are not what the frame carries.
 */
export function readPageSet(head: Buffer, restBytes: number, inRam: (gpa: number, len: number) => boolean): { data: number[]; zero: number[] } {
  const base = head.readBigUInt64LE(0);
  if (base % BigInt(PAGE) !== 0n || base > BigInt(Number.MAX_SAFE_INTEGER)) throw streamError(`PAGE_SET at 0x${base.toString(16)} is not a page address`);
  const gpa0 = Number(base);
  // A window wholly in RAM (all but a region's last, short one) needs no check per page.
  const whole = inRam(gpa0, SET_PAGES * PAGE);
  const data: number[] = [];
  const zero: number[] = [];
  // Byte by byte, then only the bits set: an idle guest's window names a few pages of 256.
  for (let i = 0; i < SET_BITMAP; i++) {
    const d = head[8 + i]!;
    const z = head[8 + SET_BITMAP + i]!;
    if ((d | z) === 0) continue;
    if ((d & z) !== 0) throw streamError(`PAGE_SET at 0x${base.toString(16)}: page ${i * 8 + lowestBit(d & z)} is both data and zero`);
    for (let v = d | z; v !== 0; v &= v - 1) {
      const bit = lowestBit(v);
      const gpa = gpa0 + (i * 8 + bit) * PAGE;
      if (!whole && !inRam(gpa, PAGE)) throw streamError(`PAGE_SET at 0x${base.toString(16)}: page ${i * 8 + bit} lies outside guest RAM`);
      if (((d >> bit) & 1) === 1) data.push(gpa);
      else zero.push(gpa);
    }
  }
  if (restBytes !== data.length * PAGE) throw streamError(`PAGE_SET at 0x${base.toString(16)} names ${data.length} pages of data and carries ${restBytes} bytes`);
  return { data, zero };
}

/** The index of the lowest set bit of a non-zero byte. */
const lowestBit = (v: number): number => 31 - Math.clz32(v & -v);

const ZERO_PAGE = Buffer.alloc(PAGE);

/**
 * PAGE_SET frames written straight into one staging buffer and sent about a MiB at a time: no
 * buffer, view or array per frame or per page (the last round, sent while the guest is paused,
 * is hundreds of windows of a few pages each). Pages that are all zeros go as bits.
 */
export class PageSetWriter {
  private stage: Buffer;
  private used = 0;
  /** Pages the last window() sent with their bytes, and as zero. */
  dataPages = 0;
  zeroPages = 0;

  constructor(private readonly sock: Socket, private readonly flushAt = 1024 * 1024) {
    this.stage = Buffer.allocUnsafeSlow(flushAt + SET_FRAME_MAX);
  }

  /**
   * One window's frame: the pages of `mem` (the window's `n` <= SET_PAGES pages, from guest
   * address `gpa`) whose bits are set in `bitmap` from byte `first` on (bit k of byte first +
   * (k >> 3): page k; bits past n are ignored). Writes the staged frames once they pass the flush
   * size (and waits as send() does).
   */
  async window(gpa: number, mem: Uint8Array, bitmap: Uint8Array, first: number, n: number): Promise<void> {
    const b = this.stage;
    const head = this.used;
    let at = head + 8 + SET_HEAD;
    b.writeUInt32LE(FRAME.PAGE_SET, head);
    b.writeUInt32LE(gpa % 2 ** 32, head + 8);
    b.writeUInt32LE(Math.floor(gpa / 2 ** 32), head + 12);
    b.fill(0, head + 16, at);
    let data = 0;
    let zero = 0;
    const bytes = (n + 7) >> 3;
    for (let i = 0; i < bytes; i++) {
      let v = bitmap[first + i]!;
      if (v === 0) continue;
      if (i === bytes - 1 && (n & 7) !== 0) v &= (1 << (n & 7)) - 1;
      for (; v !== 0; v &= v - 1) {
        const k = i * 8 + lowestBit(v);
        const src = k * PAGE;
        if (ZERO_PAGE.compare(mem, src, src + PAGE) === 0) {
          b[head + 16 + SET_BITMAP + i]! |= 1 << (k & 7);
          zero++;
        } else {
          // Buffer's copy takes ranges: no view per page. `mem` is a Uint8Array, which it accepts.
          Buffer.prototype.copy.call(mem, b, at, src, src + PAGE);
          b[head + 16 + i]! |= 1 << (k & 7);
          at += PAGE;
          data++;
        }
      }
    }
    this.dataPages = data;
    this.zeroPages = zero;
    if (data + zero === 0) return;
    b.writeUInt32LE(at - head - 8, head + 4);
    this.used = at;
    if (this.used >= this.flushAt) await this.flush();
  }

  /** Write what is staged (and wait as send() does); the socket keeps the buffer, the next frames go to a new one. */
  async flush(): Promise<void> {
    if (this.used === 0) return;
    const out = this.stage.subarray(0, this.used);
    this.stage = Buffer.allocUnsafeSlow(this.flushAt + SET_FRAME_MAX);
    this.used = 0;
    await send(this.sock, [out]);
  }
}

/** Bytes the sender lets the socket queue before it waits for them to drain. */
const SEND_QUEUE = 4 * 1024 * 1024;

/** Write `parts` and wait until the socket has taken them (backpressure: never buffer a whole VM in memory). */
export async function send(sock: Socket, parts: Uint8Array[]): Promise<void> {
  // A socket closed earlier fires no more events: waiting for 'drain' or 'close' would never end.
  if (sock.destroyed || !sock.writable) throw new TypevisorError("MIGRATION_PEER", "the connection is closed");
  // One writev for a frame's parts (header, address, pages), not a system call and, over TCP,
  // a segment each.
  sock.cork();
  for (const p of parts) sock.write(p);
  sock.uncork();
  // Wait only once a few MiB are queued, not at the socket's 16 KiB high-water mark: scattered
  // dirty pages are one small frame each, and a wait per frame (an event-loop turn, a syscall
  // each) was most of the time the last round took while the guest was paused.
  if (sock.writableLength > SEND_QUEUE) {
    if (sock.destroyed) throw new TypevisorError("MIGRATION_PEER", "the connection closed while sending");
    await new Promise<void>((resolve, reject) => {
      const onDrain = (): void => {
        sock.off("close", onClose);
        resolve();
      };
      const onClose = (): void => {
        sock.off("drain", onDrain);
        reject(new TypevisorError("MIGRATION_PEER", "the connection closed while sending"));
      };
      sock.once("drain", onDrain);
      sock.once("close", onClose);
    });
  }
}

export interface Frame {
  type: number;
  payload: Buffer;
}

/** Frames FrameReader.next hands on piece by piece (see there). */
export interface DirectFrames {
  /** The frame types taken this way, each with the bytes of its head (a frame shorter than its head comes whole). */
  heads: ReadonlyMap<number, number>;
  /**
   * Check a frame's head (throw to refuse the frame) and return where its rest goes:
   * `target(at, max)` is a writable view for the rest's bytes from offset `at`, at least one and
   * at most `max` bytes long; the reader fills each view it asks for (ReadIntoFrameReader has the
   * kernel read into it; FrameReader copies into it) before it asks for the next.
   */
  begin(type: number, head: Buffer, restBytes: number): FrameTarget;
}

/** Where a direct frame's rest goes (DirectFrames.begin). */
export type FrameTarget = (at: number, max: number) => Uint8Array;

/** What the two readers (FrameReader, and read-into.ts ReadIntoFrameReader for plain sockets) offer. */
export interface FrameSource {
  /** The next frame; a direct frame's rest goes to its target (see DirectFrames). */
  next(direct?: DirectFrames): Promise<Frame>;
  /** The next frame, which must be `type` (an ERROR frame from the peer becomes its message). */
  expect(type: FrameType): Promise<Buffer>;
}

/** A frame header's type and length checked: MIGRATION_STREAM before anything is read or allocated for it. */
export function checkFrameHeader(type: number, length: number): void {
  if (NAMES[type] === undefined) throw streamError(`unknown frame type ${type}`);
  if (length > MAX_FRAME) throw streamError(`a ${NAMES[type]} frame claims ${length} bytes, over the ${MAX_FRAME}-byte limit`);
}

/** `expect` for either reader: the frame must be `type`; an ERROR frame from the peer becomes its message. */
export function expectedPayload(f: Frame, type: FrameType): Buffer {
  if (f.type === FRAME.ERROR && type !== FRAME.ERROR) throw new TypevisorError("MIGRATION_PEER", `the peer failed: ${f.payload.toString("utf8").slice(0, 2000)}`);
  if (f.type !== type) throw streamError(`expected ${NAMES[type]}, got ${NAMES[f.type]}`);
  return f.payload;
}

/**
 * Frames from a socket, one at a time, with every length checked before anything is buffered
 * for it. `next()` rejects when the peer closes or sends garbage. Reads through the socket's
 * 'data' events (each read a new buffer from Node): for TLS, whose records Node decrypts into
 * buffers of its own; a plain socket is read with read-into.ts ReadIntoFrameReader instead.
 */
export class FrameReader implements FrameSource {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private waiter: (() => void) | undefined;
  private ended: Error | undefined;

  constructor(private readonly sock: Socket) {
    sock.on("data", (d: Buffer) => {
      this.chunks.push(d);
      this.buffered += d.length;
      // Do not read more than one frame ahead: the peer waits until we have taken this one.
      if (this.buffered > 2 * MAX_FRAME) sock.pause();
      this.wake();
    });
    const end = (why: string) => (): void => {
      this.ended ??= new TypevisorError("MIGRATION_PEER", why);
      this.wake();
    };
    sock.on("end", end("the peer closed the connection"));
    sock.on("close", end("the connection closed"));
    sock.on("error", (e: Error) => {
      this.ended ??= new TypevisorError("MIGRATION_PEER", `connection failed: ${e.message}`);
      this.wake();
    });
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = undefined;
    w?.();
  }

  /**
   * The next `n` buffered bytes (n <= buffered), copying only those: a view of the first chunk
   * when it holds them all, else one new buffer. (Concatenating everything buffered for each take,
   * as this once did, copied up to twice MAX_FRAME per frame header and again per payload.)
   * The chunks are the socket's own fresh buffers, never reused by it, so a view stays valid.
   */
  private take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    let out: Buffer;
    if (first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
    } else {
      out = Buffer.allocUnsafe(n);
      for (let got = 0; got < n; ) {
        const c = this.chunks[0]!;
        const k = Math.min(c.length, n - got);
        c.copy(out, got, 0, k);
        got += k;
        if (k === c.length) this.chunks.shift();
        else this.chunks[0] = c.subarray(k);
      }
    }
    this.buffered -= n;
    if (this.buffered <= MAX_FRAME) this.sock.resume();
    return out;
  }

  private async need(n: number): Promise<void> {
    while (this.buffered < n) {
      if (this.ended !== undefined) throw this.ended;
      await new Promise<void>((resolve) => (this.waiter = resolve));
    }
  }

  /**
   * The next frame. With `direct`, a frame of a type it names is not gathered into one buffer:
   * its head comes as the payload, and the rest is copied into the views `direct.begin`'s target
   * gives, from the pieces the socket delivered (bulk data, PAGES: one copy, into guest memory, and no
   * allocation per frame; gathering each 2 MiB frame first cost an allocation the size of the
   * data, and the collections it caused, in the destination's one event loop).
   */
  async next(direct?: DirectFrames): Promise<Frame> {
    await this.need(8);
    const h = this.take(8);
    const type = h.readUInt32LE(0);
    const length = h.readUInt32LE(4);
    checkFrameHeader(type, length);
    await this.need(length);
    const headBytes = direct?.heads.get(type);
    if (direct === undefined || headBytes === undefined || length < headBytes) return { type, payload: this.take(length) };
    const head = this.take(headBytes);
    // A head begin() refuses throws here: nothing of the rest is handed on (the stream is over).
    this.consume(length - headBytes, direct.begin(type, head, length - headBytes));
    return { type, payload: head };
  }

  /** Copy the next `n` buffered bytes (n <= buffered) into the views `target` gives. */
  private consume(n: number, target: FrameTarget): void {
    for (let at = 0; at < n; ) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length, n - at);
      for (let off = 0; off < k; ) {
        const t = target(at + off, k - off);
        const m = Math.min(t.length, k - off);
        t.set(c.subarray(off, off + m));
        off += m;
      }
      at += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    this.buffered -= n;
    if (this.buffered <= MAX_FRAME) this.sock.resume();
  }

  async expect(type: FrameType): Promise<Buffer> {
    return expectedPayload(await this.next(), type);
  }
}

export function frameName(type: number): string {
  return NAMES[type] ?? String(type);
}

/**
 * The memory a migrated state describes: the VM's RAM regions, back to back as a snapshot's
 * memory file would hold them (the stream carries the pages themselves).
 */
export function streamedMemory(regions: readonly { guestPhysAddr: number; size: number }[]): NonNullable<SnapshotState["memory"]> {
  let off = 0;
  const layout = regions.map((r) => {
    const out = { guestPhysAddr: r.guestPhysAddr, size: r.size, fileOffset: off };
    off += r.size;
    return out;
  });
  return { file: "memory", bytes: off, regions: layout };
}
