import { describe, expect, it } from "vitest";
import { earlyThreads } from "./early-threads.js";

const argv = (...args: string[]): string[] => ["/usr/bin/node", "/x/bin/typevisor.js", ...args];

describe("which `run` starts its VM's threads as it begins", () => {
  it("a boot with devices: the device thread and its vCPU threads (capped), however --cpus is written", () => {
    expect(earlyThreads(argv("run", "--image", "minimal", "--disk", "/d.img"))).toEqual({ deviceThread: true, vcpuThreads: 1 });
    expect(earlyThreads(argv("run", "--kernel", "k", "--rng", "--cpus", "4"))).toEqual({ deviceThread: true, vcpuThreads: 4 });
    expect(earlyThreads(argv("run", "--kernel", "k", "--net=tap=t0", "--cpus=2"))).toEqual({ deviceThread: true, vcpuThreads: 2 });
    // The count is checked later (the host's KVM limit): a big or bogus one starts few or one here.
    expect(earlyThreads(argv("run", "--kernel", "k", "--rng", "--cpus", "4096"))?.vcpuThreads).toBe(8);
    expect(earlyThreads(argv("run", "--kernel", "k", "--rng", "--cpus", "zero"))?.vcpuThreads).toBe(1);
    expect(earlyThreads(argv("run", "--kernel", "k", "--rng", "--cpus", "-3"))?.vcpuThreads).toBe(1);
    expect(earlyThreads(argv("run", "--kernel", "k", "--rng", "--cpus"))?.vcpuThreads).toBe(1);
  });

  it("a boot without devices wants no device thread; a restore starts both (its snapshot has devices as a rule)", () => {
    expect(earlyThreads(argv("run", "--kernel", "k", "--cpus", "2"))).toEqual({ deviceThread: false, vcpuThreads: 2 });
    expect(earlyThreads(argv("run", "--no-lab", "--id", "vm1", "--restore", "/snap", "--cpus", "3"))).toEqual({ deviceThread: true, vcpuThreads: 1 });
  });

  it("none where this process builds no VM itself or starts its threads its own way", () => {
    for (const args of [
      ["run", "--help"],
      ["run", "-h"],
      ["run", "--standby", "--api-socket", "/s"],
      ["run", "--incoming", "tcp:0.0.0.0:7000", "--plain-tcp"],
      ["run", "--incoming=unix:/m.sock"],
      ["run", "--sandbox", "--kernel", "k", "--disk", "/d"],
      ["image", "build", "minimal"],
      ["vm", "run", "x"],
      [],
    ]) {
      expect(earlyThreads(argv(...args)), args.join(" ")).toBeUndefined();
    }
    // --sandbox-probe (a test hook the jail passes its VMM) is not --sandbox: no match on the prefix.
    expect(earlyThreads(argv("run", "--sandbox-probe", "/etc", "--kernel", "k", "--rng"))).toEqual({ deviceThread: true, vcpuThreads: 1 });
  });
});
