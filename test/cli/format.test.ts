/**
 * The CLI's text output: tables line up (text left, numbers right), durations
 * read at a glance, and the client-side parsers reject what the daemon would
 * otherwise reject with a less specific message.
 */
import { describe, expect, it } from "vitest";
import { formatDuration, formatNumber, formatTime, renderFields, renderTable } from "../../src/cli/format.js";
import { resolveTarget } from "../../src/cli/connect.js";
import { exitCodeFor } from "../../src/cli/main.js";
import { formatVmTable, parseDetachKey, parseNet, parseWhole, specFromOptions } from "../../src/cli/vm.js";
import { ApiError } from "../../src/api/client.js";
import { TypevisorError } from "../../src/errors.js";
import type { VmInfo } from "../../src/control/spec.js";

describe("renderTable", () => {
  it("sizes columns from content, left-aligns text and right-aligns numbers", () => {
    const out = renderTable(["NAME", "CPUS", "STATE"], [["a", 1, "running"], ["longer-name", 16, "stopped"]]);
    expect(out).toBe(["NAME         CPUS  STATE", "a               1  running", "longer-name    16  stopped", ""].join("\n"));
  });

  it("honours an explicit alignment for formatted numbers and prints missing values as '-'", () => {
    const out = renderTable(["NAME", { title: "MEMORY", align: "right" }, "PID"], [["a", "512 MiB", undefined], ["b", "1.5 GiB", 42]]);
    expect(out.split("\n")).toEqual(["NAME   MEMORY  PID", "a     512 MiB    -", "b     1.5 GiB   42", ""]);
  });

  it("has no trailing spaces and works with no rows", () => {
    expect(renderTable(["A", "B"], [])).toBe("A  B\n");
    for (const line of renderTable(["NAME", "NOTE"], [["x", ""], ["yyyy", "z"]]).split("\n")) expect(line).toBe(line.trimEnd());
  });
});

describe("renderFields", () => {
  it("lines values up and leaves out absent ones", () => {
    expect(renderFields([["name", "vm1"], ["pid", undefined], ["console log", "/x"]])).toBe("name:         vm1\nconsole log:  /x\n");
  });
});

describe("formatDuration", () => {
  it.each([
    [0, "0ms"],
    [850, "850ms"],
    [1234, "1.2s"],
    [9_990, "9.9s"],
    [42_000, "42s"],
    [192_000, "3m12s"],
    [3_600_000 + 5 * 60_000, "1h05m"],
    [3 * 86_400_000 + 4 * 3_600_000, "3d04h"],
    [-5, "0s"],
    [Number.NaN, "0s"],
  ])("%d ms → %s", (ms, text) => {
    expect(formatDuration(ms)).toBe(text);
  });
});

describe("small formatters", () => {
  it("numbers and times", () => {
    expect(formatNumber(2)).toBe("2");
    expect(formatNumber(0.34)).toBe("0.3");
    expect(formatTime("2024-05-01T12:00:03.123Z")).toBe("2024-05-01 12:00:03Z");
  });
});

describe("vm ls table", () => {
  const base = { id: "abc", createdAt: "2024-01-01T00:00:00.000Z", updatedAt: "2024-01-01T00:00:00.000Z", consoleLog: "/c", apiSocket: "/a", restarts: 0 };
  it("shows size, pid and uptime only for a VM with a VMM", () => {
    const vms: VmInfo[] = [
      { ...base, name: "web", state: "running", spec: { cpus: 2, memoryMiB: 512 }, pid: 1234, startedAt: "2024-01-01T00:00:00.000Z", disks: [{ name: "disk0", path: "/d", sizeBytes: 2 * 2 ** 30, format: "qcow2", pool: "default", allocatedBytes: 2 ** 20 }] },
      { ...base, name: "db", state: "stopped", spec: { cpus: 1, memoryMiB: 64 }, pid: 99, startedAt: "2023-01-01T00:00:00.000Z", disks: [] },
    ];
    const out = formatVmTable(vms, Date.parse("2024-01-01T00:03:12.000Z")).split("\n");
    expect(out[0]).toBe("NAME  STATE    CPUS    MEMORY     DISK   PID  UPTIME");
    expect(out[1]).toBe("web   running     2   512 MiB  2.0 GiB  1234   3m12s");
    expect(out[2]).toBe("db    stopped     1  64.0 MiB        -     -       -");
  });
});

describe("client-side input", () => {
  it("whole numbers", () => {
    expect(parseWhole("--memory", "64")).toBe(64);
    expect(() => parseWhole("--memory", "abc", "MiB")).toThrow(/--memory must be a whole number of MiB \(got "abc"\)/);
    expect(() => parseWhole("--cpus", "1.5")).toThrow(/whole number/);
    expect(() => parseWhole("--cpus", "")).toThrow(/whole number/);
  });

  it("--net", () => {
    expect(parseNet("tap=tap0")).toEqual({ tap: "tap0" });
    expect(parseNet("tap=tap0,mac=52:54:00:12:34:56")).toEqual({ tap: "tap0", mac: "52:54:00:12:34:56" });
    expect(() => parseNet("tap0")).toThrow(/tap=NAME/);
    expect(() => parseNet("mac=52:54:00:12:34:56")).toThrow(/tap=NAME is required/);
    expect(() => parseNet("tap=a,tap=b")).toThrow(/given twice/);
  });

  it("--detach-key", () => {
    expect(parseDetachKey("ctrl-]")).toBe(0x1d);
    expect(parseDetachKey("ctrl-a")).toBe(0x01);
    expect(parseDetachKey("^X")).toBe(0x18);
    expect(() => parseDetachKey("ctrl-1")).toThrow(/ctrl-KEY/);
    expect(() => parseDetachKey("x")).toThrow(/ctrl-KEY/);
  });

  it("the spec carries only what was given, with absolute paths", () => {
    expect(specFromOptions("vm1", { kernel: "k/bzImage", cpus: "2", memory: "64", net: ["tap=t0"], rng: false }, "/home/u")).toEqual({
      name: "vm1",
      kernel: "/home/u/k/bzImage",
      cpus: 2,
      memoryMiB: 64,
      nets: [{ tap: "t0" }],
      rng: false,
    });
    expect(specFromOptions("vm1", { image: "minimal", rng: true })).toEqual({ name: "vm1", image: "minimal" });
  });
});

describe("where the daemon is", () => {
  it("--host, --socket, --home, $TYPEVISOR_SOCKET, then the data home", () => {
    expect(resolveTarget({ host: "127.0.0.1:8420" }, {})).toEqual({ host: "127.0.0.1", port: 8420 });
    expect(resolveTarget({ host: "[::1]:80" }, {})).toEqual({ host: "::1", port: 80 });
    expect(resolveTarget({ socket: "/s.sock" }, {})).toEqual({ socketPath: "/s.sock" });
    expect(resolveTarget({ home: "/h" }, {})).toEqual({ socketPath: "/h/typevisor.sock" });
    expect(resolveTarget({}, { TYPEVISOR_SOCKET: "/e.sock" })).toEqual({ socketPath: "/e.sock" });
    expect(resolveTarget({}, { TYPEVISOR_HOME: "/th" })).toEqual({ socketPath: "/th/typevisor.sock" });
    expect(() => resolveTarget({ host: "nohost" }, {})).toThrow(/HOST:PORT/);
    expect(() => resolveTarget({ home: "/h", socket: "/s" }, {})).toThrow(/give one of --socket, --home/);
  });
});

describe("exit codes", () => {
  it.each([
    [new TypevisorError("DAEMON_UNREACHABLE", "x"), 5],
    [new ApiError(404, "VM_NOT_FOUND", "x"), 3],
    [new ApiError(404, "NOT_FOUND", "x"), 3],
    [new ApiError(409, "VM_STATE", "x"), 4],
    [new ApiError(409, "VM_EXISTS", "x"), 4],
    [new ApiError(409, "INSUFFICIENT_RESOURCES", "x"), 4],
    [new ApiError(409, "KVM_UNSUITABLE", "x"), 4],
    [new ApiError(400, "INVALID_REQUEST", "x"), 2],
    [new ApiError(502, "VM_START_FAILED", "x"), 1],
    [new ApiError(504, "VMM_TIMEOUT", "x"), 1],
    [new ApiError(500, "INTERNAL", "x"), 1],
    [new TypevisorError("INVALID_ARGUMENT", "x"), 2],
    [new TypevisorError("SYSCALL_FAILED", "x"), 1],
  ])("%s → %d", (e, code) => {
    expect(exitCodeFor(e)).toBe(code);
  });
});
