/**
 * FrameReader over a real unix socket: whatever way the bytes are cut into writes (and so into the
 * reads the destination sees), it gives back exactly the frames sent, in order, byte for byte; a
 * hostile header (unknown type, a length over MAX_FRAME) or a stream cut mid-frame is an error,
 * never a hang or an allocation sized by the peer.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { connect, createServer, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { afterAll, describe, expect, it } from "vitest";
import { FRAME, FrameReader, MAX_FRAME, frame, type DirectFrames, type FrameType } from "./protocol.js";

const dir = mkdtempSync(join(tmpdir(), "tv-frames-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;

/** A connected pair: `write` is the client end, `read` the server's. */
async function socketPair(): Promise<{ write: Socket; read: Socket; close: () => void }> {
  const path = join(dir, `s${n++}.sock`);
  const accepted = new Promise<Socket>((resolve) => {
    const srv = createServer((s) => {
      srv.close();
      resolve(s);
    }).listen(path);
  });
  const write = connect(path);
  const read = await accepted;
  return { write, read, close: () => (write.destroy(), read.destroy()) };
}

/** Write `bytes` in pieces of the given sizes (cycled), each its own write and event-loop turn. */
async function writeInPieces(s: Socket, bytes: Buffer, sizes: number[]): Promise<void> {
  for (let off = 0, i = 0; off < bytes.length; i++) {
    const k = Math.min(bytes.length - off, sizes[i % sizes.length]!);
    s.write(bytes.subarray(off, off + k));
    off += k;
    if (i % 7 === 0) await new Promise((r) => setImmediate(r));
  }
}

const types = Object.values(FRAME) as FrameType[];

describe("FrameReader", () => {
  it("returns every frame sent, in order and intact, however the stream is cut", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.record({ type: fc.constantFrom(...types), length: fc.oneof(fc.constant(0), fc.integer({ min: 1, max: 64 }), fc.integer({ min: 4000, max: 300_000 })), seed: fc.integer({ min: 0, max: 255 }) }), { minLength: 1, maxLength: 12 }),
        fc.array(fc.integer({ min: 1, max: 200_000 }), { minLength: 1, maxLength: 5 }),
        async (frames, sizes) => {
          const payloads = frames.map((f) => Buffer.alloc(f.length).map((_, i) => (i * 31 + f.seed) & 0xff));
          const bytes = Buffer.concat(frames.flatMap((f, i) => frame(f.type, payloads[i]!)));
          const p = await socketPair();
          try {
            const reader = new FrameReader(p.read);
            const writing = writeInPieces(p.write, bytes, sizes);
            for (let i = 0; i < frames.length; i++) {
              const got = await reader.next();
              expect(got.type).toBe(frames[i]!.type);
              expect(got.payload.equals(payloads[i]!)).toBe(true);
            }
            await writing;
          } finally {
            p.close();
          }
        },
      ),
      { numRuns: 40 },
    );
  });

  it("hands a direct frame's rest to its sink piece by piece, every byte once and in place, and other frames whole", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.record({ type: fc.constantFrom(FRAME.PAGES, FRAME.STATE, FRAME.ZEROS), length: fc.oneof(fc.integer({ min: 0, max: 12 }), fc.integer({ min: 4000, max: 300_000 })), seed: fc.integer({ min: 0, max: 255 }) }), { minLength: 1, maxLength: 10 }),
        fc.array(fc.integer({ min: 1, max: 200_000 }), { minLength: 1, maxLength: 5 }),
        async (frames, sizes) => {
          const payloads = frames.map((f) => Buffer.alloc(f.length).map((_, i) => (i * 31 + f.seed) & 0xff));
          const bytes = Buffer.concat(frames.flatMap((f, i) => frame(f.type, payloads[i]!)));
          const p = await socketPair();
          try {
            let rest: Buffer | undefined;
            let seen = new Uint8Array(0);
            const direct: DirectFrames = {
              heads: new Map([[FRAME.PAGES, 8]]),
              begin: (type, head, restBytes) => {
                expect(type).toBe(FRAME.PAGES);
                expect(head.length).toBe(8);
                rest = Buffer.alloc(restBytes);
                seen = new Uint8Array(restBytes);
                return (piece, at) => {
                  for (let k = at; k < at + piece.length; k++) seen[k]!++;
                  piece.copy(rest!, at);
                };
              },
            };
            const reader = new FrameReader(p.read);
            const writing = writeInPieces(p.write, bytes, sizes);
            for (let i = 0; i < frames.length; i++) {
              rest = undefined;
              const got = await reader.next(direct);
              const want = payloads[i]!;
              expect(got.type).toBe(frames[i]!.type);
              if (frames[i]!.type === FRAME.PAGES && want.length >= 8) {
                expect(got.payload.equals(want.subarray(0, 8))).toBe(true);
                expect(rest!.equals(want.subarray(8))).toBe(true);
                expect(seen.every((b) => b === 1)).toBe(true);
              } else {
                expect(rest).toBeUndefined();
                expect(got.payload.equals(want)).toBe(true);
              }
            }
            await writing;
          } finally {
            p.close();
          }
        },
      ),
      { numRuns: 40 },
    );
  });

  it("a direct frame whose head is refused hands nothing on, and the error is begin's", async () => {
    const p = await socketPair();
    try {
      const reader = new FrameReader(p.read);
      let pieces = 0;
      const direct: DirectFrames = {
        heads: new Map([[FRAME.PAGES, 8]]),
        begin: () => {
          throw new Error("outside guest RAM");
        },
      };
      p.write.write(Buffer.concat(frame(FRAME.PAGES, Buffer.alloc(100_000, 7))));
      await expect(reader.next({ ...direct, begin: (t, h, n) => (direct.begin(t, h, n), () => void pieces++) })).rejects.toThrow(/outside guest RAM/);
      expect(pieces).toBe(0);
    } finally {
      p.close();
    }
  });

  it("a payload taken is not changed by the frames read after it", async () => {
    const p = await socketPair();
    try {
      const reader = new FrameReader(p.read);
      const a = Buffer.alloc(100_000, 0xaa);
      const b = Buffer.alloc(100_000, 0xbb);
      await writeInPieces(p.write, Buffer.concat([...frame(FRAME.PAGES, a), ...frame(FRAME.PAGES, b)]), [65_536, 3]);
      const first = await reader.next();
      const second = await reader.next();
      expect(first.payload.equals(a)).toBe(true);
      expect(second.payload.equals(b)).toBe(true);
    } finally {
      p.close();
    }
  });

  it("refuses an unknown frame type and a length over MAX_FRAME before reading the payload", async () => {
    for (const [type, length, msg] of [
      [99, 4, /unknown frame type 99/],
      [FRAME.PAGES, MAX_FRAME + 1, /over the \d+-byte limit/],
      [FRAME.STATE, 0xffffffff, /over the \d+-byte limit/],
    ] as const) {
      const p = await socketPair();
      try {
        const reader = new FrameReader(p.read);
        const h = Buffer.alloc(8);
        h.writeUInt32LE(type, 0);
        h.writeUInt32LE(length, 4);
        p.write.write(h);
        await expect(reader.next()).rejects.toMatchObject({ code: "MIGRATION_STREAM", message: expect.stringMatching(msg) });
      } finally {
        p.close();
      }
    }
  });

  it("a stream that ends inside a frame is an error, not a wait", async () => {
    const p = await socketPair();
    try {
      const reader = new FrameReader(p.read);
      const bytes = Buffer.concat(frame(FRAME.PAGES, Buffer.alloc(10_000, 1)));
      p.write.end(bytes.subarray(0, 5000));
      await expect(reader.next()).rejects.toMatchObject({ code: "MIGRATION_PEER" });
    } finally {
      p.close();
    }
  });
});
