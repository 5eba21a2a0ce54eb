import fc from "fast-check";
import { describe, expect, it } from "vitest";
import type { GuestMemory } from "../../../memory/guest-memory.js";
import { featureBit, VIRTIO_F, VIRTIO_ID } from "../device.js";
import { QueueDriver } from "../queue/driver.js";
import { fuzzCase, harness, runFuzzCase } from "../queue/test-fuzz.js";
import { RngDevice } from "./rng.js";

const DATA = 0x8000;

function rig(dev: RngDevice) {
  const { h, drv } = harness(dev, featureBit(VIRTIO_F.VERSION_1), (m) => new QueueDriver(m, 8, 0));
  dev.activate(h.ctx);
  return { h, drv, mem: h.mem };
}

describe("RngDevice", () => {
  it("is device type 4 with one queue and no config", () => {
    const dev = new RngDevice();
    expect(dev.deviceType).toBe(VIRTIO_ID.RNG);
    expect(dev.queueMaxSizes).toEqual([256]);
    expect(dev.configSize).toBe(0);
    expect(dev.readConfig(0, 4)).toBe(0n);
    expect(() => new RngDevice({ queueSize: 3 })).toThrow(/power of 2/);
  });

  it("fills every writable buffer and reports the bytes written", () => {
    const dev = new RngDevice();
    const { h, drv, mem } = rig(dev);
    const head = drv.addChain([
      { addr: DATA, len: 300, write: true },
      { addr: DATA + 0x1000, len: 700, write: true },
    ]);
    drv.publish(head);
    dev.notify(0);
    expect(drv.takeUsed()).toEqual([{ id: head, len: 1000 }]);
    // 300 and 700 random bytes are all zero with probability 2^-8000.
    expect(mem.read(DATA, 300).some((b) => b !== 0)).toBe(true);
    expect(mem.read(DATA + 0x1000, 700).some((b) => b !== 0)).toBe(true);
    expect(mem.readU8(DATA + 300)).toBe(0);
    expect(h.interrupts).toEqual([0]);
  });

  it("bounds one request to maxBytesPerRequest", () => {
    const dev = new RngDevice({ maxBytesPerRequest: 1000 });
    const { drv, mem } = rig(dev);
    drv.publish(drv.addChain([{ addr: DATA, len: 4096, write: true }]));
    dev.notify(0);
    expect(drv.takeUsed()[0]?.len).toBe(1000);
    expect(mem.read(DATA + 1000, 3096).every((b) => b === 0)).toBe(true);
  });

  it("does nothing before activation and after reset; save reports the cursors", () => {
    const dev = new RngDevice();
    expect(() => dev.notify(0)).not.toThrow();
    const { drv } = rig(dev);
    drv.publish(drv.addChain([{ addr: DATA, len: 8, write: true }]));
    dev.notify(0);
    expect(dev.save()).toMatchObject({ activated: true, queues: [{ nextAvail: 1, nextUsed: 1 }] });
    dev.reset();
    drv.publish(drv.addChain([{ addr: DATA, len: 8, write: true }]));
    dev.notify(0);
    expect(drv.takeUsed()).toHaveLength(1);
    expect(dev.save()).toMatchObject({ activated: false, queues: [] });
  });

  it("on adversarial rings: never throws, writes only where allowed, still serves a good request (property)", () => {
    const good = (mem: GuestMemory, drv: QueueDriver) => {
      mem.fill(0x3000, 64, 0);
      const head = drv.addChain([{ addr: 0x3000, len: 64, write: true }]);
      return { head, check: (len: number) => expect(len).toBe(64) };
    };
    fc.assert(
      fc.property(fuzzCase([0]), (c) => runFuzzCase(new RngDevice({ maxBytesPerRequest: 4096 }), c, good)),
      { numRuns: 200 },
    );
  });
});
