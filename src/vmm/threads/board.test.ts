import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { EXIT } from "../../kvm/ioctls.js";
import {
  PHASE,
  PhaseWatch,
  ROW_BYTES,
  SAMPLE_MAX_MS,
  SAMPLE_MS,
  SLOT,
  WORD,
  boardRow,
  clockMs,
  createBoard,
  decodeDeviceWord,
  decodeVcpuWord,
  deviceRow,
  deviceWord,
  enterStamped,
  isStamped,
  nextSampleMs,
  phaseName,
  readRow,
  vcpuWord,
  withMailbox,
  withPhase,
  type PhaseCode,
  type PhaseName,
} from "./board.js";
import { deviceThreadPhase, ioThreadReport, vcpuReport } from "./report.js";

const codes = Object.values(PHASE) as PhaseCode[];
const phaseArb = fc.constantFrom(...codes);

describe("thread board layout", () => {
  it("has one code per phase name, and names every code back", () => {
    expect(new Set(codes).size).toBe(codes.length);
    for (const [name, code] of Object.entries(PHASE)) expect(phaseName(code)).toBe(name);
    expect(phaseName(200)).toBe("none");
    expect(codes.every((c) => c >= 0 && c <= 0xff)).toBe(true);
  });

  it("encodes and decodes a vCPU's state word (phase, exit reason, direction, size, mailbox)", () => {
    fc.assert(
      fc.property(phaseArb, fc.integer({ min: 0, max: 255 }), fc.boolean(), fc.integer({ min: 0, max: 15 }), fc.boolean(), (phase, reason, write, size, mailbox) => {
        const w = mailbox ? withMailbox(vcpuWord(phase, reason, write, size)) : vcpuWord(phase, reason, write, size);
        expect(decodeVcpuWord(w)).toEqual({ phase: phaseName(phase), reason, write, size, mailbox });
        // Another phase keeps the exit's details (run after an exit: the last one handled) and drops the mailbox wait.
        expect(decodeVcpuWord(withPhase(w, PHASE.run))).toEqual({ phase: "run", reason, write, size, mailbox: false });
      }),
    );
  });

  it("encodes and decodes the device thread's state word (phase, device, queue)", () => {
    fc.assert(
      fc.property(phaseArb, fc.integer({ min: 0, max: 255 }), fc.integer({ min: 0, max: 0xffff }), (phase, device, queue) => {
        expect(decodeDeviceWord(deviceWord(phase, device, queue))).toEqual({ phase: phaseName(phase), device, queue });
      }),
    );
  });

  it("gives each thread its own cache lines, all starting, stamped now", () => {
    expect(ROW_BYTES % 64).toBe(0);
    expect(ROW_BYTES).toBeGreaterThanOrEqual(128);
    const before = clockMs();
    const sab = createBoard(3);
    expect(sab.byteLength).toBe(4 * ROW_BYTES);
    for (let r = 0; r < 4; r++) {
      const snap = readRow(boardRow(sab, r));
      expect(snap.word & 0xff).toBe(PHASE.starting);
      expect(snap.tid).toBe(0);
      expect(snap.since).toBeGreaterThanOrEqual(before);
      expect(snap.since).toBeLessThanOrEqual(clockMs());
    }
    expect(deviceRow(3)).toBe(3);
    // A writer's stores land in its row only.
    const row1 = boardRow(sab, 1);
    row1.i32[WORD.STATE] = vcpuWord(PHASE.exit, EXIT.IO, true, 1);
    row1.i32[WORD.TID] = 4242;
    row1.f64[SLOT.ADDR] = 0x3f8;
    enterStamped(boardRow(sab, 2), vcpuWord(PHASE.paused), 1234.5);
    expect(readRow(boardRow(sab, 1))).toMatchObject({ word: vcpuWord(PHASE.exit, EXIT.IO, true, 1), tid: 4242, addr: 0x3f8 });
    expect(readRow(boardRow(sab, 2))).toMatchObject({ word: vcpuWord(PHASE.paused), since: 1234.5 });
    expect(readRow(boardRow(sab, 0)).word & 0xff).toBe(PHASE.starting);
    expect(readRow(boardRow(sab, 3)).word & 0xff).toBe(PHASE.starting);
  });

  it("stamps only the phases a vCPU does not enter per exit", () => {
    expect(isStamped(PHASE.run)).toBe(false);
    expect(isStamped(PHASE.exit)).toBe(false);
    for (const p of ["starting", "paused", "finished", "poll", "notify", "command"] as PhaseName[]) expect(isStamped(PHASE[p])).toBe(true);
  });

  it("has one clock for every thread: process.hrtime's, in ms", () => {
    const a = clockMs();
    const hr = Number(process.hrtime.bigint()) / 1e6;
    const b = clockMs();
    expect(hr).toBeGreaterThanOrEqual(a - 1);
    expect(hr).toBeLessThanOrEqual(b + 1);
    expect(b).toBeGreaterThanOrEqual(a);
  });

  it("times an unstamped phase from observations: it grows while nothing moves, and restarts when anything does", () => {
    const w = new PhaseWatch();
    expect(w.observe("v0", 7, 100, 1000)).toBe(0);
    expect(w.observe("v0", 7, 100, 1250)).toBe(250);
    expect(w.observe("v0", 7, 100, 3000)).toBe(2000);
    expect(w.observe("v0", 7, 101, 3100)).toBe(0); // one more exit
    expect(w.observe("v0", 8, 101, 3200)).toBe(0); // another phase
    expect(w.observe("v0", 8, 101, 3300)).toBe(100);
    expect(w.observe("v1", 8, 101, 3300)).toBe(0); // keys are separate
    expect(w.changes).toBe(4); // every first sight of a pair, none of the unchanged ones
  });

  it("samples every 250 ms while anything moves, backs off to one look in 8 s while nothing does", () => {
    const waits: number[] = [];
    let ms = SAMPLE_MS;
    for (let i = 0; i < 8; i++) waits.push((ms = nextSampleMs(ms, false)));
    expect(waits).toEqual([500, 1000, 2000, 4000, 8000, 8000, 8000, 8000]);
    expect(nextSampleMs(8000, true)).toBe(SAMPLE_MS);
    expect(nextSampleMs(0, false)).toBe(SAMPLE_MS); // never below the base
    expect(SAMPLE_MAX_MS).toBe(8000);
  });
});

describe("GET /threads pieces", () => {
  const snap = (word: number, extra: Partial<{ seq: number; tid: number; addr: number; since: number }> = {}) => ({ word, seq: 0, tid: 77, addr: 0, since: 0, ...extra });

  it("reports a vCPU in an io exit waiting on the mailbox, and its time from observations", () => {
    const w = new PhaseWatch();
    const word = withMailbox(vcpuWord(PHASE.exit, EXIT.IO, false, 4));
    expect(vcpuReport(0, snap(word, { addr: 0xcfc }), 10, 5000, w)).toEqual({
      id: 0, tid: 77, phase: "exit", phaseMs: 0, exits: 10,
      exit: { reason: "io", address: "0xcfc", write: false, size: 4, mailbox: true },
    });
    expect(vcpuReport(0, snap(word, { addr: 0xcfc }), 10, 6500, w).phaseMs).toBe(1500);
    // run keeps the last exit; an mmio address is shown in hex.
    const mmio = vcpuReport(1, snap(withPhase(vcpuWord(PHASE.exit, EXIT.MMIO, true, 8), PHASE.run), { addr: 0xfebf_0000 }), 3, 100, w);
    expect(mmio).toMatchObject({ phase: "run", exit: { reason: "mmio", address: "0xfebf0000", write: true, size: 8, mailbox: false } });
    // A halt has no address; a stamped phase counts from its stamp.
    expect(vcpuReport(2, snap(vcpuWord(PHASE.paused, EXIT.HLT), { since: 1000 }), 5, 4000, w)).toMatchObject({ phase: "paused", phaseMs: 3000, exit: { reason: "hlt", mailbox: false } });
    expect(vcpuReport(2, snap(vcpuWord(PHASE.paused, EXIT.HLT)), 5, 4000, w).exit).not.toHaveProperty("address");
    // Not started: no tid, no exit yet.
    expect(vcpuReport(3, snap(vcpuWord(PHASE.starting), { tid: 0, since: 900 }), 0, 1000, w)).toEqual({ id: 3, tid: null, phase: "starting", phaseMs: 100, exits: 0, exit: null });
  });

  it("names the device and queue the device thread serves", () => {
    const names = ["virtio-blk /d at 00:01.0", "virtio-rng at 00:02.0"];
    expect(deviceThreadPhase(snap(deviceWord(PHASE.notify, 1, 0), { seq: 9, since: 100 }), names, 350)).toEqual({ tid: 77, phase: "notify", phaseMs: 250, passes: 9, device: names[1], queue: 0 });
    expect(deviceThreadPhase(snap(deviceWord(PHASE.backend, 0), { since: 100 }), names, 100)).toMatchObject({ phase: "backend", device: names[0] });
    expect(deviceThreadPhase(snap(deviceWord(PHASE.poll), { since: 100 }), names, 1100)).toEqual({ tid: 77, phase: "poll", phaseMs: 1000, passes: 0 });
  });

  it("reports a disk's I/O thread from its ring: none, idle (no thread now), starting, running (busy or idle), failed", () => {
    const w = new PhaseWatch();
    const status = (submitted: number, completed: number, tid = 50, active = true) => ({ tid, submitted, completed, stopping: false, active, current: submitted === completed ? null : { op: "flush", pos: 0, len: 0 } });
    expect(ioThreadReport(0, "d0", undefined, undefined, 0, w)).toMatchObject({ state: "none", name: null, busy: false, inFlight: 0 });
    // A ring with no thread on it (not started yet, or ended after idling): its history stays.
    expect(ioThreadReport(0, "d0", { name: "tv-blk0", status: status(7, 7, 0, false), alive: false }, undefined, 0, w)).toMatchObject({ state: "idle", name: "tv-blk0", tid: null, completed: 7, busy: false });
    expect(ioThreadReport(0, "d0", { name: "tv-blk0", status: status(0, 0, 0), alive: false }, undefined, 0, w)).toMatchObject({ state: "starting", tid: null });
    const busy = ioThreadReport(1, "d1", { name: "tv-blk1", status: status(5, 3), alive: true }, { name: "d1", ioThread: "running", inFlight: 2 }, 1000, w);
    expect(busy).toMatchObject({ state: "running", tid: 50, busy: true, inFlight: 2, current: { op: "flush" }, completed: 3, deviceInFlight: 2, phaseMs: 0 });
    expect(ioThreadReport(1, "d1", { name: "tv-blk1", status: status(5, 3), alive: true }, undefined, 3000, w).phaseMs).toBe(2000);
    // The counters wrap at 2^32 (Int32 in the ring).
    expect(ioThreadReport(2, "d2", { name: "tv-blk2", status: status(-2147483647, 2147483647), alive: true }, undefined, 0, w).inFlight).toBe(2);
    expect(ioThreadReport(3, "d3", { name: "tv-blk3", status: status(1, 1), alive: false }, undefined, 0, w).state).toBe("failed");
    expect(ioThreadReport(3, "d3", { name: "tv-blk3", status: status(1, 1), alive: true }, { name: "d3", ioThread: "failed", inFlight: 0 }, 0, w).state).toBe("failed");
  });
});
