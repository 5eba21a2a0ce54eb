import { tmpdir } from "node:os";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { TypevisorError } from "../errors.js";
import { thrown } from "../../test/helpers/thrown.js";
import {
  budget,
  busyCpus,
  checkAllocation,
  DEFAULT_POLICY,
  discoverHost,
  hostUsed,
  parseMeminfo,
  parsePolicy,
  parseProcStat,
  report,
  type Allocation,
  type HostCapacity,
  type OvercommitPolicy,
} from "./resources.js";
import { GiB, MiB } from "../size.js";

const HOST: HostCapacity = { cpus: 8, memoryBytes: 16 * GiB, diskBytes: 100 * GiB, diskFreeBytes: 60 * GiB };
const NONE: Allocation = { cpus: 0, memoryBytes: 0, diskBytes: 0 };
const ALL = { cpu: true, memory: true, disk: true };


describe("parsePolicy", () => {
  it("defaults, numbers and numeric strings", () => {
    expect(parsePolicy({})).toEqual(DEFAULT_POLICY);
    expect(DEFAULT_POLICY).toEqual({ cpu: 4, memory: 1, disk: 1, reservedMemoryBytes: 256 * MiB });
    expect(parsePolicy({ cpu: "8", memory: 1.5, disk: " 2 " }, "1G")).toEqual({ cpu: 8, memory: 1.5, disk: 2, reservedMemoryBytes: GiB });
    expect(parsePolicy({ memory: 64 }).memory).toBe(64);
  });

  it.each([0, -1, 65, Number.NaN, Number.POSITIVE_INFINITY, "", "abc", "4x", "1e999"])("rejects ratio %j", (v) => {
    const e = thrown(() => parsePolicy({ cpu: v }));
    expect(e.code).toBe("INVALID_ARGUMENT");
    expect(e.message).toMatch(/overcommit ratio for cpu must be a number above 0 and at most 64/);
  });

  it("rejects unknown resources and a bad reserve", () => {
    expect(thrown(() => parsePolicy({ mem: 2 } as never)).message).toMatch(/unknown overcommit resource "mem"/);
    expect(thrown(() => parsePolicy({}, "lots")).code).toBe("INVALID_ARGUMENT");
  });
});

describe("budget, checkAllocation and report", () => {
  const policy: OvercommitPolicy = { cpu: 4, memory: 1, disk: 1, reservedMemoryBytes: 256 * MiB };

  it("budget is capacity × ratio, memory less the reserve and never below 0", () => {
    expect(budget(HOST, policy)).toEqual({ cpus: 32, memoryBytes: 16 * GiB - 256 * MiB, diskBytes: 100 * GiB });
    expect(budget({ ...HOST, memoryBytes: 100 * MiB }, policy).memoryBytes).toBe(0);
    expect(budget(HOST, { ...policy, memory: 1.5, disk: 0.5 })).toMatchObject({ memoryBytes: 24 * GiB - 256 * MiB, diskBytes: 50 * GiB });
  });

  it("admits up to the budget exactly", () => {
    const b = budget(HOST, policy);
    expect(() => checkAllocation(HOST, policy, NONE, b, ALL)).not.toThrow();
    expect(() => checkAllocation(HOST, policy, b, { cpus: 1, memoryBytes: 0, diskBytes: 0 }, { memory: true, disk: true })).not.toThrow();
  });

  it("names the short resource, what is free and where the budget comes from", () => {
    const host: HostCapacity = { cpus: 2, memoryBytes: 23.4 * GiB, diskBytes: 100 * GiB, diskFreeBytes: 0 };
    const allocated: Allocation = { cpus: 1, memoryBytes: 23.4 * GiB - 256 * MiB - 1.5 * GiB, diskBytes: 0 };
    const e = thrown(() => checkAllocation(host, policy, allocated, { cpus: 1, memoryBytes: 4 * GiB, diskBytes: 10 * GiB }, ALL));
    expect(e.code).toBe("INSUFFICIENT_RESOURCES");
    expect(e.message).toBe("not enough memory: asked 4.0 GiB, 1.5 GiB free of 23.1 GiB budget (23.4 GiB host × overcommit 1.0 − 256 MiB reserved)");
    expect(e.hint).toBeTruthy();
  });

  it("says when a VM is larger than the host can back at all, whatever else runs", () => {
    const host: HostCapacity = { cpus: 2, memoryBytes: 24 * GiB, diskBytes: 100 * GiB, diskFreeBytes: 0 };
    const e = thrown(() => checkAllocation(host, policy, NONE, { cpus: 1, memoryBytes: 32 * GiB, diskBytes: 0 }, ALL));
    expect(e.message).toBe("not enough memory: asked 32.0 GiB, more than this host can back at all: 23.8 GiB budget (24.0 GiB host × overcommit 1.0 − 256 MiB reserved)");
    // Twice the overcommit: 32 GiB fits.
    expect(() => checkAllocation(host, { ...policy, memory: 2 }, NONE, { cpus: 1, memoryBytes: 32 * GiB, diskBytes: 0 }, ALL)).not.toThrow();
  });

  it("names every resource short, and only those asked about", () => {
    const allocated: Allocation = { cpus: 31, memoryBytes: 15 * GiB, diskBytes: 99 * GiB };
    const req: Allocation = { cpus: 2, memoryBytes: 2 * GiB, diskBytes: 20 * GiB };
    const e = thrown(() => checkAllocation(HOST, { ...policy, cpu: 4 }, allocated, req, ALL));
    expect(e.message).toBe(
      "not enough CPUs: asked 2, 1 free of 32 budget (8 host × overcommit 4.0); " +
        "not enough memory: asked 2.0 GiB, 768 MiB free of 15.8 GiB budget (16.0 GiB host × overcommit 1.0 − 256 MiB reserved); " +
        "not enough disk: asked 20.0 GiB, 1.0 GiB free of 100 GiB budget (100 GiB host × overcommit 1.0)",
    );
    expect(() => checkAllocation(HOST, policy, allocated, req, {})).not.toThrow();
    expect(thrown(() => checkAllocation(HOST, policy, allocated, req, { disk: true })).message).toMatch(/^not enough disk: [^;]*$/);
  });

  it("shows 0 free, not a negative number, when a stricter policy left VMs over budget", () => {
    const e = thrown(() => checkAllocation(HOST, { ...policy, cpu: 0.5 }, { ...NONE, cpus: 10 }, { ...NONE, cpus: 1 }, { cpu: true }));
    expect(e.message).toBe("not enough CPUs: asked 1, 0 free of 4 budget (8 host × overcommit 0.5)");
  });

  it("rejects nonsense requests", () => {
    expect(thrown(() => checkAllocation(HOST, policy, NONE, { ...NONE, memoryBytes: -1 }, ALL)).code).toBe("INVALID_ARGUMENT");
    expect(thrown(() => checkAllocation(HOST, policy, NONE, { ...NONE, cpus: Number.NaN }, ALL)).code).toBe("INVALID_ARGUMENT");
  });

  it("never lets allocations exceed the budget (property)", () => {
    const hostArb = fc.record({
      cpus: fc.integer({ min: 1, max: 256 }),
      memoryBytes: fc.integer({ min: 0, max: 4096 * GiB }),
      diskBytes: fc.integer({ min: 0, max: 1024 * 1024 * GiB }),
      diskFreeBytes: fc.constant(0),
    });
    const ratio = fc.double({ min: 0.01, max: 64, noNaN: true });
    const policyArb = fc.record({ cpu: ratio, memory: ratio, disk: ratio, reservedMemoryBytes: fc.integer({ min: 0, max: 64 * GiB }) });
    const req = fc.record({ cpus: fc.integer({ min: 0, max: 64 }), memoryBytes: fc.integer({ min: 0, max: 256 * GiB }), diskBytes: fc.integer({ min: 0, max: 4096 * GiB }) });
    fc.assert(
      fc.property(hostArb, policyArb, fc.array(req, { maxLength: 40 }), (host, pol, reqs) => {
        const total: Allocation = { ...NONE };
        for (const r of reqs) {
          try {
            checkAllocation(host, pol, total, r, ALL);
          } catch (e) {
            expect((e as TypevisorError).code).toBe("INSUFFICIENT_RESOURCES");
            continue;
          }
          total.cpus += r.cpus;
          total.memoryBytes += r.memoryBytes;
          total.diskBytes += r.diskBytes;
        }
        const b = budget(host, pol);
        expect(total.cpus).toBeLessThanOrEqual(b.cpus);
        expect(total.memoryBytes).toBeLessThanOrEqual(b.memoryBytes);
        expect(total.diskBytes).toBeLessThanOrEqual(b.diskBytes);
        const rep = report(host, pol, total, { cpus: 0, memoryBytes: 0, diskBytes: 0 });
        for (const line of [rep.cpu, rep.memory, rep.disk]) expect(line.free).toBe(line.budget - line.allocated);
      }),
    );
  });

  it("report lines", () => {
    const r = report(HOST, policy, { cpus: 6, memoryBytes: 4 * GiB, diskBytes: 10 * GiB }, { cpus: 1.5, memoryBytes: 3 * GiB, diskBytes: 40 * GiB });
    expect(r.cpu).toEqual({ capacity: 8, budget: 32, allocated: 6, used: 1.5, free: 26 });
    expect(r.memory).toEqual({ capacity: 16 * GiB, budget: 16 * GiB - 256 * MiB, allocated: 4 * GiB, used: 3 * GiB, free: 12 * GiB - 256 * MiB });
    expect(r.disk).toEqual({ capacity: 100 * GiB, budget: 100 * GiB, allocated: 10 * GiB, used: 40 * GiB, free: 90 * GiB });
    expect(r.overcommit).toEqual(policy);
  });
});

describe("host readers", () => {
  it("parses /proc/stat: busy excludes idle and iowait, guest time is not counted twice", () => {
    const text = "cpu  100 10 50 800 40 5 5 20 30 0\ncpu0 50 5 25 400 20 2 3 10 15 0\ncpu1 50 5 25 400 20 3 2 10 15 0\nintr 1 2\n";
    expect(parseProcStat(text)).toEqual({ busyTicks: 170, totalTicks: 1030, cpus: 2 });
    expect(busyCpus({ busyTicks: 100, totalTicks: 500, cpus: 2 }, { busyTicks: 200, totalTicks: 700, cpus: 2 })).toBe(1);
    expect(busyCpus({ busyTicks: 1, totalTicks: 1, cpus: 2 }, { busyTicks: 1, totalTicks: 1, cpus: 2 })).toBe(0);
    expect(() => parseProcStat("intr 1\n")).toThrow(TypevisorError);
  });

  it("parses /proc/meminfo in bytes", () => {
    const m = parseMeminfo("MemTotal:       16384 kB\nMemAvailable:    8192 kB\nHugePages_Total:       0\nActive(anon):  4 kB\n");
    expect(m.get("MemTotal")).toBe(16384 * 1024);
    expect(m.get("MemAvailable")).toBe(8192 * 1024);
    expect(m.get("HugePages_Total")).toBe(0);
    expect(m.get("Active(anon)")).toBe(4096);
  });

  it("discovers this host and what it uses", () => {
    const h = discoverHost(tmpdir());
    expect(h.cpus).toBeGreaterThanOrEqual(1);
    expect(h.memoryBytes).toBeGreaterThan(64 * MiB);
    expect(h.diskBytes).toBeGreaterThan(0);
    expect(h.diskFreeBytes).toBeLessThanOrEqual(h.diskBytes);
    const first = hostUsed(tmpdir());
    expect(first.used.cpus).toBeGreaterThanOrEqual(0);
    expect(first.used.cpus).toBeLessThanOrEqual(first.sample.cpus);
    expect(first.used.memoryBytes).toBeGreaterThan(0);
    expect(first.used.memoryBytes).toBeLessThanOrEqual(h.memoryBytes);
    expect(first.used.diskBytes).toBeLessThanOrEqual(h.diskBytes);
    const next = hostUsed(tmpdir(), first.sample);
    expect(next.used.cpus).toBeGreaterThanOrEqual(0);
    expect(next.used.cpus).toBeLessThanOrEqual(next.sample.cpus);
  });

  it("names a missing data directory", () => {
    const e = thrown(() => discoverHost("/nonexistent/typevisor-data"));
    expect(e.code).toBe("FILE_NOT_FOUND");
    expect(e.message).toContain("/nonexistent/typevisor-data");
  });
});
