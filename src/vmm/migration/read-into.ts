/**
 * The destination's frame reader for a plain socket (a unix socket: what `run --incoming` gets
 * from the daemon's relay; or plain TCP): the kernel reads a PAGES frame's pages straight into
 * guest memory. Node's `onread` option of net.Socket (a caller's buffer for each read, and a
 * function that names the buffer for the next one) replaces the 'data' events, which hand a new
 * 64 KiB buffer per read that FrameReader then copies into guest memory.
 *
 * Measured on the host (project machine, 256 MiB over loopback TCP into fresh memory, the
 * receiving process's CPU): 'data' events and a copy 343-614 ms; a reused 64 KiB buffer and a
 * copy 237-260 ms; read straight into place 143-258 ms, 3-4 ms of it user time. The fresh buffer
 * per read costs the kernel a page fault per 4 KiB and V8 a collection every few megabytes.
 *
 * How reads go: a frame's header (8 bytes) and anything under a page are read through a 64 KiB
 * spill buffer and copied from it (small frames come many to a read, and a header's read takes
 * the start of its payload along); a payload with a page or more left is read into its own place: the PAGES target's view of guest memory, or the buffer
 * allocated for the frame (its length checked against MAX_FRAME first). At most one frame is
 * read ahead of the consumer: after a header, reading stops until next() says whether the frame
 * goes direct (DirectFrames); what the spill read past that point is kept and taken first.
 */
import { Socket } from "node:net";
import { TypevisorError } from "../../errors.js";
import { checkFrameHeader, expectedPayload, FrameReader, type DirectFrames, type Frame, type FrameSource, type FrameTarget, type FrameType } from "./protocol.js";

const SPILL = 64 * 1024;
/** A payload with at least this much left is read in place (a page: less comes with the frames after it, through the spill). */
const IN_PLACE_MIN = 4096;

type Stage = "header" | "await" | "head" | "rest" | "payload" | "failed";

/** A net.Socket's libuv stream handle, as Node keeps it (`_handle`; checked before it is taken). */
interface StreamHandle {
  readStart(): number;
  readStop(): number;
  useUserBuffer(buf: Uint8Array): void;
}

/**
 * A reader for `accepted`, and the socket to use from now on: for a plain socket accepted paused
 * (transport.ts listens with pauseOnConnect) its handle moves to a socket that reads with
 * `onread` (ReadIntoFrameReader); a TLS socket, or one whose handle Node no longer exposes this
 * way, keeps FrameReader's 'data' events.
 */
export function frameReaderFor(accepted: Socket): { sock: Socket; reader: FrameSource; readInto: boolean } {
  const h = (accepted as unknown as { _handle?: Partial<StreamHandle> | null })._handle;
  const encrypted = (accepted as unknown as { encrypted?: boolean }).encrypted === true;
  if (encrypted || h == null || typeof h.useUserBuffer !== "function" || typeof h.readStart !== "function" || accepted.bytesRead > 0) {
    accepted.resume();
    return { sock: accepted, reader: new FrameReader(accepted), readInto: false };
  }
  (accepted as unknown as { _handle: null })._handle = null;
  const r = new ReadIntoFrameReader(h);
  return { sock: r.sock, reader: r, readInto: true };
}

export class ReadIntoFrameReader implements FrameSource {
  readonly sock: Socket;
  private readonly spill = Buffer.allocUnsafe(SPILL);
  private readonly header = Buffer.alloc(8);
  private stage: Stage = "header";
  /** The buffer being filled (undefined at "await" and "failed"), how much of it is, and what follows. */
  private want: Uint8Array | undefined;
  private filled = 0;
  private whenFilled: () => void = () => undefined;
  /** The view of `want` handed to Node for the next read (a read into it lands in place), if any. */
  private handed: Uint8Array | undefined;
  /** Bytes the spill read past a header that waits for next() (a view of the spill): taken first when it comes. */
  private held: Uint8Array | undefined;
  private type = 0;
  private length = 0;
  private rest = { head: Buffer.alloc(0), target: undefined as FrameTarget | undefined, at: 0, total: 0 };
  private waiter: { direct: DirectFrames | undefined; resolve: (f: Frame) => void; reject: (e: Error) => void } | undefined;
  /** Why no more bytes come (the peer closed, a hostile frame): frames already whole still go out. */
  private ended: Error | undefined;
  private reading = true;
  /** Bytes the kernel read straight into their place (a payload's buffer or a target's view), not through the spill. */
  bytesInPlace = 0;

  /** `handle`: a connected socket's stream handle that has read nothing yet (frameReaderFor). */
  constructor(handle: unknown) {
    this.startHeader();
    // `handle` is not in SocketConstructorOpts' type; net.Socket takes it (child_process passes handles this way).
    const opts = { handle, onread: { buffer: () => this.nextBuffer(), callback: (n: number, buf: Uint8Array) => this.onRead(n, buf) } };
    this.sock = new Socket(opts as unknown as ConstructorParameters<typeof Socket>[0]);
    const closed = (why: string) => (): void => this.closed(new TypevisorError("MIGRATION_PEER", why));
    this.sock.on("end", closed("the peer closed the connection"));
    this.sock.on("close", closed("the connection closed"));
    this.sock.on("error", (e: Error) => this.closed(new TypevisorError("MIGRATION_PEER", `connection failed: ${e.message}`)));
    // Flowing, so that the end of the stream is reported ('end') once it is read.
    this.sock.resume();
  }

  next(direct?: DirectFrames): Promise<Frame> {
    if (this.waiter !== undefined) return Promise.reject(new TypevisorError("INTERNAL", "a frame is already awaited"));
    return new Promise<Frame>((resolve, reject) => {
      this.waiter = { direct, resolve, reject };
      this.pump();
    });
  }

  async expect(type: FrameType): Promise<Buffer> {
    return expectedPayload(await this.next(), type);
  }

  // ---- the consumer's side ----

  /** A waiter came: the payload its header waited for, what was held, then (still waiting) the socket. */
  private pump(): void {
    if (this.waiter === undefined) return;
    if (this.stage === "await") this.beginPayload(this.waiter.direct);
    if (this.held !== undefined && this.stage !== "await") {
      const h = this.held;
      this.held = undefined;
      this.feed(h);
    }
    if (this.waiter === undefined) return;
    // More bytes are needed (nothing is held while a waiter waits: a header with a waiter goes on to its payload).
    if (this.ended !== undefined) {
      this.reject(this.ended);
      return;
    }
    if (!this.reading && this.want !== undefined) {
      this.reading = true;
      // net.Socket.resume restarts an onread socket's reads (tryReadStart) when they were stopped.
      this.sock.resume();
    }
  }

  private reject(e: Error): void {
    const w = this.waiter;
    this.waiter = undefined;
    w?.reject(e);
  }

  // ---- Node's side: where the next read goes, and what it brought ----

  private nextBuffer(): Uint8Array {
    const w = this.want;
    if (w !== undefined && this.held === undefined && this.ended === undefined && w.length - this.filled >= IN_PLACE_MIN) {
      // The kernel reads into this view (libuv's next read). Safe: it lies inside the frame's own
      // buffer or inside its target's view of guest RAM (begin() checked the range first), no
      // longer than what the frame has left; guest memory stays mapped until the VM is discarded,
      // and the destination destroys the socket (uv_close stops reading) before it discards.
      this.handed = w.subarray(this.filled);
      return this.handed;
    }
    this.handed = undefined;
    return this.spill;
  }

  /** Returns whether to read on (false stops reading until pump() resumes it). */
  private onRead(n: number, buf: Uint8Array): boolean {
    try {
      if (buf === this.handed && this.want !== undefined) {
        this.handed = undefined;
        this.filled += n;
        this.bytesInPlace += n;
        if (this.filled === this.want.length) this.whenFilled();
      } else this.feed(buf.subarray(0, n));
    } catch (e) {
      this.fail(e instanceof Error ? e : new Error(String(e)));
    }
    this.reading = this.want !== undefined && this.held === undefined && this.ended === undefined;
    return this.reading;
  }

  /**
   * Copy `bytes` into what is wanted, frame by frame; what lies past a header that waits for
   * next() is held as a view (no copy: the spill is not read into again until everything held
   * is taken, since reading stays stopped while anything is held).
   */
  private feed(bytes: Uint8Array): void {
    let off = 0;
    while (off < bytes.length && this.want !== undefined) {
      const want = this.want;
      const k = Math.min(want.length - this.filled, bytes.length - off);
      want.set(bytes.subarray(off, off + k), this.filled);
      this.filled += k;
      off += k;
      if (this.filled === want.length) this.whenFilled();
    }
    if (off < bytes.length && this.stage === "await") this.held = bytes.subarray(off);
  }

  // ---- the frame's steps ----

  private fill(buf: Uint8Array, then: () => void): void {
    this.want = buf;
    this.filled = 0;
    this.handed = undefined;
    this.whenFilled = then;
    if (buf.length === 0) then();
  }

  private startHeader(): void {
    this.stage = "header";
    this.fill(this.header, () => {
      this.type = this.header.readUInt32LE(0);
      this.length = this.header.readUInt32LE(4);
      try {
        checkFrameHeader(this.type, this.length);
      } catch (e) {
        this.fail(e as Error);
        return;
      }
      this.stage = "await";
      this.want = undefined;
      if (this.waiter !== undefined) this.beginPayload(this.waiter.direct);
    });
  }

  private beginPayload(direct: DirectFrames | undefined): void {
    const headBytes = direct?.heads.get(this.type);
    if (direct !== undefined && headBytes !== undefined && this.length >= headBytes) {
      this.stage = "head";
      const head = Buffer.allocUnsafe(headBytes);
      this.fill(head, () => {
        try {
          // A head begin() refuses ends the stream here: nothing of the rest is read into place.
          this.rest = { head, target: direct.begin(this.type, head, this.length - headBytes), at: 0, total: this.length - headBytes };
        } catch (e) {
          this.fail(e as Error);
          return;
        }
        this.stage = "rest";
        this.nextRest();
      });
      return;
    }
    this.stage = "payload";
    // At most MAX_FRAME (checkFrameHeader); every byte is read into it before it is handed on.
    const payload = Buffer.allocUnsafe(this.length);
    this.fill(payload, () => this.complete({ type: this.type, payload }));
  }

  private nextRest(): void {
    const r = this.rest;
    if (r.at === r.total) {
      this.complete({ type: this.type, payload: r.head });
      return;
    }
    let view: Uint8Array;
    try {
      view = r.target!(r.at, r.total - r.at);
      if (view.length < 1 || view.length > r.total - r.at) throw new TypevisorError("INTERNAL", `a frame target gave ${view.length} bytes for ${r.total - r.at}`);
    } catch (e) {
      this.fail(e as Error);
      return;
    }
    this.fill(view, () => {
      r.at += view.length;
      this.nextRest();
    });
  }

  private complete(f: Frame): void {
    const w = this.waiter;
    this.waiter = undefined;
    this.rest = { head: Buffer.alloc(0), target: undefined, at: 0, total: 0 };
    this.startHeader();
    w?.resolve(f);
  }

  /** A hostile frame or a refused head: the stream is over, nothing more is read or handed on. */
  private fail(e: Error): void {
    this.ended ??= e;
    this.stage = "failed";
    this.want = undefined;
    this.handed = undefined;
    this.held = undefined;
    this.reject(this.ended);
  }

  /** The connection ended: a frame still being read cannot be finished (one held whole can: pump()). */
  private closed(e: Error): void {
    this.ended ??= e;
    if (this.waiter !== undefined) this.reject(this.ended);
  }
}
