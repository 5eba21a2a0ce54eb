/**
 * Both frame readers over a real unix socket: FrameReader ('data' events: TLS) and
 * read-into.ts ReadIntoFrameReader (Node's onread: a plain socket's bytes read into place).
 * Whatever way the bytes are cut into writes (and so into the reads the destination sees), each
 * gives back exactly the frames sent, in order, byte for byte, a direct frame's rest in the views
 * its target gives; a hostile header (unknown type, a length over MAX_FRAME) or a stream cut
 * mid-frame is an error, never a hang or an allocation sized by the peer.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { connect, createServer, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { afterAll, describe, expect, it } from "vitest";
import { FRAME, FrameReader, MAX_FRAME, PAGE, PageSetWriter, frame, pageSetHead, pageSetTarget, readPageSet, SET_HEAD, SET_PAGES, setPageBit, type DirectFrames, type FrameSource, type FrameType } from "./protocol.js";
import { frameReaderFor } from "./read-into.js";

const dir = mkdtempSync(join(tmpdir(), "tv-frames-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;

type Open = (accepted: Socket) => { reader: FrameSource; sock: Socket };
const kinds: [string, Open][] = [
  ["FrameReader", (s) => (s.resume(), { reader: new FrameReader(s), sock: s })],
  [
    "ReadIntoFrameReader",
    (s) => {
      const r = frameReaderFor(s);
      // On this Node the handle moves to an onread socket; if it stopped doing so, this says it.
      expect(r.readInto).toBe(true);
      return r;
    },
  ],
];

/** A connected pair: `write` is the client end; `reader` reads the server's end (accepted paused, as transport.ts does). */
async function socketPair(open: Open): Promise<{ write: Socket; reader: FrameSource; close: () => void }> {
  const path = join(dir, `s${n++}.sock`);
  const accepted = new Promise<Socket>((resolve) => {
    const srv = createServer({ pauseOnConnect: true }, (s) => {
      srv.close();
      resolve(s);
    }).listen(path);
  });
  const write = connect(path);
  const { reader, sock } = open(await accepted);
  return { write, reader, close: () => (write.destroy(), sock.destroy()) };
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

/** `n` bytes of (i * mul + seed) & 0xff: a plain loop (Buffer.map calls back per byte: seconds for the property runs' megabytes under load). */
function pattern(n: number, mul: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = (i * mul + seed) & 0xff;
  return b;
}

const types = Object.values(FRAME) as FrameType[];

describe.each(kinds)("%s", (_name, open) => {
  it("returns every frame sent, in order and intact, however the stream is cut", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.record({ type: fc.constantFrom(...types), length: fc.oneof(fc.constant(0), fc.integer({ min: 1, max: 64 }), fc.integer({ min: 4000, max: 300_000 })), seed: fc.integer({ min: 0, max: 255 }) }), { minLength: 1, maxLength: 12 }),
        fc.array(fc.integer({ min: 1, max: 200_000 }), { minLength: 1, maxLength: 5 }),
        async (frames, sizes) => {
          const payloads = frames.map((f) => pattern(f.length, 31, f.seed));
          const bytes = Buffer.concat(frames.flatMap((f, i) => frame(f.type, payloads[i]!)));
          const p = await socketPair(open);
          try {
            const reader = p.reader;
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

  it("puts a direct frame's rest into the views its target gives, each filled once and in order, and other frames whole", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.record({ type: fc.constantFrom(FRAME.PAGES, FRAME.STATE, FRAME.PAGE_SET), length: fc.oneof(fc.integer({ min: 0, max: 12 }), fc.integer({ min: 4000, max: 300_000 })), seed: fc.integer({ min: 0, max: 255 }) }), { minLength: 1, maxLength: 10 }),
        fc.array(fc.integer({ min: 1, max: 200_000 }), { minLength: 1, maxLength: 5 }),
        fc.array(fc.integer({ min: 1, max: 300_000 }), { minLength: 1, maxLength: 4 }),
        async (frames, sizes, views) => {
          const payloads = frames.map((f) => pattern(f.length, 31, f.seed));
          const bytes = Buffer.concat(frames.flatMap((f, i) => frame(f.type, payloads[i]!)));
          const p = await socketPair(open);
          try {
            let rest: Buffer | undefined;
            let next = 0;
            let asked = 0;
            const direct: DirectFrames = {
              heads: new Map([[FRAME.PAGES, 8]]),
              begin: (type, head, restBytes) => {
                expect(type).toBe(FRAME.PAGES);
                expect(head.length).toBe(8);
                rest = Buffer.alloc(restBytes);
                next = 0;
                // Views of varying length (a guest-memory run may end at a view's edge), asked for in order.
                return (at, max) => {
                  expect(at).toBe(next);
                  expect(max).toBeGreaterThan(0);
                  expect(max).toBeLessThanOrEqual(restBytes - at);
                  const len = Math.min(max, views[asked++ % views.length]!);
                  next = at + len;
                  return rest!.subarray(at, at + len);
                };
              },
            };
            const writing = writeInPieces(p.write, bytes, sizes);
            for (let i = 0; i < frames.length; i++) {
              rest = undefined;
              const got = await p.reader.next(direct);
              const want = payloads[i]!;
              expect(got.type).toBe(frames[i]!.type);
              if (frames[i]!.type === FRAME.PAGES && want.length >= 8) {
                expect(got.payload.equals(want.subarray(0, 8))).toBe(true);
                expect(next).toBe(want.length - 8);
                expect(rest!.equals(want.subarray(8))).toBe(true);
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

  it.runIf(_name === "ReadIntoFrameReader")("reads a large frame's rest into its target's views, not through a copy", async () => {
    const p = await socketPair(open);
    try {
      const into = Buffer.alloc(MAX_FRAME - 8 - 64);
      const pages = pattern(into.length, 7, 0);
      const direct: DirectFrames = { heads: new Map([[FRAME.PAGES, 8]]), begin: () => (at, max) => into.subarray(at, at + max) };
      // The destination waits for the frame before it comes (else the header's read stops at the frame's head and the next read goes through the spill too).
      const got = p.reader.next(direct);
      await writeInPieces(p.write, Buffer.concat(frame(FRAME.PAGES, Buffer.concat([Buffer.alloc(8), pages]))), [100_000]);
      await got;
      expect(into.equals(pages)).toBe(true);
      // Only what the header's read (64 KiB) took along is copied.
      expect((p.reader as unknown as { bytesInPlace: number }).bytesInPlace).toBeGreaterThanOrEqual(pages.length - 64 * 1024);
    } finally {
      p.close();
    }
  });

  it("a direct frame whose head is refused hands nothing on, and the error is begin's", async () => {
    const p = await socketPair(open);
    try {
      const reader = p.reader;
      let pieces = 0;
      const direct: DirectFrames = {
        heads: new Map([[FRAME.PAGES, 8]]),
        begin: () => {
          throw new Error("outside guest RAM");
        },
      };
      p.write.write(Buffer.concat(frame(FRAME.PAGES, Buffer.alloc(100_000, 7))));
      await expect(reader.next({ ...direct, begin: (t, h, n) => (direct.begin(t, h, n), () => (pieces++, Buffer.alloc(1))) })).rejects.toThrow(/outside guest RAM/);
      expect(pieces).toBe(0);
    } finally {
      p.close();
    }
  });

  it("a payload taken is not changed by the frames read after it", async () => {
    const p = await socketPair(open);
    try {
      const reader = p.reader;
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
      const p = await socketPair(open);
      try {
        const reader = p.reader;
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
    const p = await socketPair(open);
    try {
      const reader = p.reader;
      const bytes = Buffer.concat(frame(FRAME.PAGES, Buffer.alloc(10_000, 1)));
      p.write.end(bytes.subarray(0, 5000));
      await expect(reader.next()).rejects.toMatchObject({ code: "MIGRATION_PEER" });
    } finally {
      p.close();
    }
  });
});

describe("PAGE_SET", () => {
  const window = fc.record({ base: fc.integer({ min: 0, max: 64 }).map((m) => m * 1024 * 1024), marks: fc.array(fc.constantFrom(0, 0, 1, 2), { minLength: SET_PAGES, maxLength: SET_PAGES }) });
  const ram = (size: number) => (gpa: number, len: number): boolean => gpa >= 0 && gpa + len <= size;

  it("reads back the pages a head marks, in order, and refuses the hostile ones", () => {
    fc.assert(
      fc.property(window, fc.integer({ min: 0, max: 70 * 1024 * 1024 }), ({ base, marks }, ramSize) => {
        const head = pageSetHead(base);
        marks.forEach((m, k) => m !== 0 && setPageBit(head, k, m === 2));
        const data = marks.flatMap((m, k) => (m === 1 ? [base + k * PAGE] : []));
        const zero = marks.flatMap((m, k) => (m === 2 ? [base + k * PAGE] : []));
        const outside = [...data, ...zero].some((g) => g + PAGE > ramSize);
        if (outside) expect(() => readPageSet(head, data.length * PAGE, ram(ramSize))).toThrow(/outside guest RAM/);
        else {
          expect(readPageSet(head, data.length * PAGE, ram(ramSize))).toEqual({ data, zero });
          expect(() => readPageSet(head, data.length * PAGE + PAGE, ram(ramSize))).toThrow(/carries/);
        }
      }),
      { numRuns: 300 },
    );
    const both = pageSetHead(0);
    setPageBit(both, 7, false);
    setPageBit(both, 7, true);
    expect(() => readPageSet(both, PAGE, ram(1 << 30))).toThrow(/page 7 is both data and zero/);
    const odd = pageSetHead(0);
    odd.writeBigUInt64LE(123n, 0);
    expect(() => readPageSet(odd, 0, ram(1 << 30))).toThrow(/not a page address/);
    expect(SET_HEAD + SET_PAGES * PAGE).toBeLessThanOrEqual(MAX_FRAME);
  });

  it("puts each data byte at its page, whatever the lengths the reader asks for", () => {
    fc.assert(
      fc.property(fc.uniqueArray(fc.integer({ min: 0, max: 63 }), { maxLength: 40 }), fc.array(fc.integer({ min: 1, max: 3 * PAGE }), { minLength: 1, maxLength: 5 }), (pages, asks) => {
        const data = [...pages].sort((a, b) => a - b).map((p) => p * PAGE);
        const mem = Buffer.alloc(64 * PAGE);
        const stream = pattern(data.length * PAGE, 13, 1);
        const target = pageSetTarget(data, (gpa, max) => mem.subarray(gpa, gpa + max));
        for (let at = 0, i = 0; at < stream.length; i++) {
          const v = target(at, Math.min(asks[i % asks.length]!, stream.length - at));
          expect(v.length).toBeGreaterThan(0);
          v.set(stream.subarray(at, at + v.length));
          at += v.length;
        }
        data.forEach((gpa, k) => expect(mem.subarray(gpa, gpa + PAGE).equals(stream.subarray(k * PAGE, (k + 1) * PAGE))).toBe(true));
        // Nothing else was written.
        const others = Array.from({ length: 64 }, (_, p) => p * PAGE).filter((g) => !data.includes(g));
        for (const g of others) expect(mem.subarray(g, g + PAGE).every((b) => b === 0)).toBe(true);
      }),
      { numRuns: 300 },
    );
  });

  it("PageSetWriter: each window's frame names exactly its marked pages, data or zero, and carries their bytes; bits past the window are ignored", async () => {
    // A window of n pages: 0 clean, 1 marked with bytes, 2 marked and all zeros; stray bits past n set.
    const windowArb = fc.integer({ min: 1, max: SET_PAGES }).chain((n) =>
      fc.record({ n: fc.constant(n), gpa: fc.integer({ min: 0, max: 1 << 20 }).map((p) => p * PAGE), marks: fc.array(fc.constantFrom(0, 0, 0, 1, 2), { minLength: n, maxLength: n }), seed: fc.integer({ min: 1, max: 250 }) }),
    );
    await fc.assert(
      fc.asyncProperty(fc.array(windowArb, { minLength: 1, maxLength: 4 }), fc.integer({ min: 1, max: 3 * PAGE }), async (windows, flushAt) => {
        const p = await socketPair(kinds[0]![1]);
        try {
          const out = new PageSetWriter(p.write, flushAt);
          const expected: { gpa: number; data: number[]; zero: number[]; bytes: Buffer }[] = [];
          for (const w of windows) {
            const mem = Buffer.alloc(w.n * PAGE);
            const bitmap = Buffer.alloc(2 + SET_PAGES / 8, 0xff);
            bitmap.fill(0, 2, 2 + ((w.n + 7) >> 3));
            for (let k = w.n; k < ((w.n + 7) & ~7); k++) bitmap[2 + (k >> 3)]! |= 1 << (k & 7);
            w.marks.forEach((m, k) => {
              if (m !== 0) bitmap[2 + (k >> 3)]! |= 1 << (k & 7);
              // Clean pages have bytes too: they must not be sent.
              if (m !== 2) mem.fill((w.seed + k) & 0xff || 1, k * PAGE, (k + 1) * PAGE);
            });
            await out.window(w.gpa, mem, bitmap, 2, w.n);
            const data = w.marks.flatMap((m, k) => (m === 1 ? [k] : []));
            const zero = w.marks.flatMap((m, k) => (m === 2 ? [k] : []));
            expect([out.dataPages, out.zeroPages]).toEqual([data.length, zero.length]);
            if (data.length + zero.length > 0) {
              expected.push({ gpa: w.gpa, data: data.map((k) => w.gpa + k * PAGE), zero: zero.map((k) => w.gpa + k * PAGE), bytes: Buffer.concat(data.map((k) => mem.subarray(k * PAGE, (k + 1) * PAGE))) });
            }
          }
          await out.flush();
          for (const e of expected) {
            const f = await p.reader.next();
            expect(f.type).toBe(FRAME.PAGE_SET);
            const got = readPageSet(f.payload.subarray(0, SET_HEAD), f.payload.length - SET_HEAD, () => true);
            expect(got).toEqual({ data: e.data, zero: e.zero });
            expect(f.payload.subarray(SET_HEAD).equals(e.bytes)).toBe(true);
          }
          p.write.end();
          await expect(p.reader.next()).rejects.toThrow();
        } finally {
          p.close();
        }
      }),
      { numRuns: 60 },
    );
  });
});
