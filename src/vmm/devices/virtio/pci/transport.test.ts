import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { PCI_ECAM_START } from "../../../arch/x86_64/layout.js";
import { GuestMemory } from "../../../memory/guest-memory.js";
import { PciBus } from "../../pci/bus.js";
import { PCI_REG } from "../../pci/config-space.js";
import { VIRTIO_F, VIRTIO_ID, featureBit, type ActivateContext, type VirtioDevice } from "../device.js";
import { COMMON, VIRTIO_MSI_NO_VECTOR, VIRTIO_PCI_CAP, VIRTIO_STATUS as S } from "./caps.js";
import { RngDevice } from "../rng/rng.js";
import { PciDriver } from "./test-pci-driver.js";
import { MSIX_BAR, VIRTIO_BAR, VirtioPciDevice } from "./transport.js";

const MEM_SIZE = 1 << 20;
const BLK_SIZE_MAX = 1; // a device-specific feature bit (virtio-blk SIZE_MAX)

class FakeDevice implements VirtioDevice {
  readonly deviceType = VIRTIO_ID.BLOCK;
  readonly queueMaxSizes = [256, 128];
  readonly configSize = 12;
  readonly cfg = new Uint8Array(12);
  activations: ActivateContext[] = [];
  notified: number[] = [];
  resets = 0;
  constructor(readonly features: bigint = featureBit(VIRTIO_F.VERSION_1) | featureBit(VIRTIO_F.EVENT_IDX) | featureBit(BLK_SIZE_MAX)) {
    new DataView(this.cfg.buffer).setBigUint64(0, 0x1_0000_2000n, true);
  }
  readConfig(offset: number, size: number): bigint {
    let v = 0n;
    for (let i = size - 1; i >= 0; i--) v = (v << 8n) | BigInt(this.cfg[offset + i] ?? 0);
    return v;
  }
  writeConfig(offset: number, size: number, value: bigint): void {
    for (let i = 0; i < size && offset + i < this.cfg.length; i++) this.cfg[offset + i] = Number((value >> BigInt(8 * i)) & 0xffn);
  }
  activate(ctx: ActivateContext): void {
    this.activations.push(ctx);
  }
  notify(q: number): void {
    this.notified.push(q);
  }
  reset(): void {
    this.resets++;
  }
  save(): unknown {
    return {};
  }
}

/** The PciDriver over a bus holding one VirtioPciDevice around `dev`, recording the MSIs it sends. */
class Driver extends PciDriver {
  readonly sent: [bigint, number][];
  readonly dev: FakeDevice;
  readonly mem: GuestMemory;
  readonly pci: VirtioPciDevice;

  constructor(dev = new FakeDevice()) {
    const sent: [bigint, number][] = [];
    const mem = new GuestMemory(new ArrayBuffer(MEM_SIZE), [{ guestPhysAddr: 0, size: MEM_SIZE, hostOffset: 0 }]);
    const bus = new PciBus();
    const pci = new VirtioPciDevice({ device: dev, mem, deliverMsi: (lo, hi, d) => sent.push([(BigInt(hi) << 32n) | BigInt(lo), d]) });
    super(bus, bus.addDevice(pci));
    this.sent = sent;
    this.dev = dev;
    this.mem = mem;
    this.pci = pci;
  }
}

describe("virtio-pci identity and capabilities (virtio 1.2 §4.1.2, §4.1.4)", () => {
  it("is 1af4:1040+type, revision 1, with subsystem IDs, no interrupt pin", () => {
    const d = new Driver();
    expect(d.cfgRead(0, 4)).toBe(0x1042_1af4);
    expect(d.cfgRead(PCI_REG.REVISION_ID, 1)).toBe(1);
    expect(d.cfgRead(PCI_REG.SUBSYSTEM_VENDOR_ID, 4)).toBe(0x0042_1af4);
    expect(d.cfgRead(PCI_REG.INTERRUPT_PIN, 1)).toBe(0);
    expect(d.cfgRead(PCI_REG.REVISION_ID, 4) >>> 8).toBe(0x018000);
  });

  it("has every structure in 64-bit BAR 4, MSI-X in BAR 1, and notify addresses one per queue", () => {
    const d = new Driver();
    for (const t of [VIRTIO_PCI_CAP.COMMON_CFG, VIRTIO_PCI_CAP.NOTIFY_CFG, VIRTIO_PCI_CAP.ISR_CFG, VIRTIO_PCI_CAP.DEVICE_CFG]) expect(d.caps.get(t)?.bar).toBe(VIRTIO_BAR);
    expect(d.caps.get(VIRTIO_PCI_CAP.COMMON_CFG)!.length).toBeGreaterThanOrEqual(0x38);
    expect(d.caps.get(VIRTIO_PCI_CAP.DEVICE_CFG)!.length).toBe(12);
    expect(d.caps.has(VIRTIO_PCI_CAP.PCI_CFG)).toBe(true);
    expect(d.cfgRead(PCI_REG.BAR0 + 4 * VIRTIO_BAR, 4) & 0xf).toBe(0b0100);
    expect(d.cfgRead(d.msixCap + 4, 4) & 7).toBe(MSIX_BAR);
    const notify = d.caps.get(VIRTIO_PCI_CAP.NOTIFY_CFG)!;
    const mult = d.cfgRead(notify.extra + 16, 4);
    expect(mult).toBe(4);
    for (const q of [0, 1]) {
      d.setCommon(COMMON.QUEUE_SELECT, 2, q);
      const off = d.common(COMMON.QUEUE_NOTIFY_OFF, 2);
      expect(d.pci.notifyAddress(q)).toEqual({ bar: VIRTIO_BAR, offset: notify.offset + off * mult });
    }
    expect(d.pci.notifyAddress(2)).toBeUndefined();
  });
});

describe("common configuration state machine (virtio 1.2 §3.1.1, §4.1.4.3)", () => {
  it("Linux's probe sequence activates the device with the queues it configured", () => {
    const d = new Driver();
    d.negotiate();
    expect(d.status() & S.FEATURES_OK).toBe(S.FEATURES_OK);
    expect(d.deviceFeatures()).toBe(featureBit(VIRTIO_F.VERSION_1) | featureBit(VIRTIO_F.EVENT_IDX) | featureBit(BLK_SIZE_MAX));
    d.setCommon(COMMON.CONFIG_MSIX_VECTOR, 2, 0);
    expect(d.common(COMMON.CONFIG_MSIX_VECTOR, 2)).toBe(0);
    expect(d.common(COMMON.NUM_QUEUES, 2)).toBe(2);
    d.setCommon(COMMON.QUEUE_SELECT, 2, 0);
    expect(d.common(COMMON.QUEUE_SIZE, 2)).toBe(256);
    d.setupQueue(0, 128, 0x10000, 1);
    d.setupQueue(1, 64, 0x20000, 2);
    for (const q of [0, 1]) {
      d.setCommon(COMMON.QUEUE_SELECT, 2, q);
      expect(d.common(COMMON.QUEUE_MSIX_VECTOR, 2)).toBe(q + 1);
      d.setCommon(COMMON.QUEUE_ENABLE, 2, 1);
      expect(d.common(COMMON.QUEUE_ENABLE, 2)).toBe(1);
    }
    d.setCommon(COMMON.QUEUE_SELECT, 2, 0);
    expect(d.common(COMMON.QUEUE_DESC, 4)).toBe(0x10000);
    expect(d.common(COMMON.QUEUE_DRIVER, 4)).toBe(0x10800);
    expect(d.dev.activations).toHaveLength(0);
    d.addStatus(S.DRIVER_OK);
    expect(d.status()).toBe(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK);
    expect(d.dev.activations).toHaveLength(1);
    const ctx = d.dev.activations[0]!;
    expect(ctx.queues).toEqual([
      { size: 128, descAddr: 0x10000, driverAddr: 0x10800, deviceAddr: 0x11000 },
      { size: 64, descAddr: 0x20000, driverAddr: 0x20400, deviceAddr: 0x21000 },
    ]);
    expect(ctx.features).toBe(d.deviceFeatures());
    expect(ctx.mem).toBe(d.mem);

    // DRIVER_OK looks at each enabled queue once (buffers posted before it), then
    // kicks go to the device, interrupts to the queue's MSI-X vector.
    expect(d.dev.notified).toEqual([0, 1]);
    d.write(VIRTIO_PCI_CAP.NOTIFY_CFG, 4, 2, 1);
    d.write(VIRTIO_PCI_CAP.NOTIFY_CFG, 0, 2, 0);
    expect(d.dev.notified).toEqual([0, 1, 1, 0]);
    // An ioeventfd kick (queueNotify) is the same as the register write; out-of-range queues do nothing.
    d.pci.queueNotify(1);
    for (const q of [2, -1, 0.5, 65536]) d.pci.queueNotify(q);
    expect(d.dev.notified).toEqual([0, 1, 1, 0, 1]);
    ctx.interruptQueue(1);
    ctx.interruptConfig();
    expect(d.sent).toEqual([
      [0xfee0_2000n, 0x42],
      [0xfee0_0000n, 0x40],
    ]);
    expect(d.common(COMMON.CONFIG_GENERATION, 1)).toBe(1);
    // Queue configuration is frozen while the device runs.
    d.setupQueue(0, 16, 0x30000, 2);
    d.setCommon(COMMON.QUEUE_SELECT, 2, 0);
    expect(d.common(COMMON.QUEUE_SIZE, 2)).toBe(128);
  });

  it("64-bit fields also accept one 8-byte write and read", () => {
    const d = new Driver();
    d.setCommon(COMMON.QUEUE_SELECT, 2, 1);
    const buf = new Uint8Array(8);
    new DataView(buf.buffer).setBigUint64(0, 0x1234_5678_9abc_def0n, true);
    d.bus.handleMmio(d.addr(VIRTIO_PCI_CAP.COMMON_CFG, COMMON.QUEUE_DEVICE), buf, true);
    const back = new Uint8Array(8);
    d.bus.handleMmio(d.addr(VIRTIO_PCI_CAP.COMMON_CFG, COMMON.QUEUE_DEVICE), back, false);
    expect(new DataView(back.buffer).getBigUint64(0, true)).toBe(0x1234_5678_9abc_def0n);
  });

  it("refuses FEATURES_OK for features the device did not offer, or without VERSION_1", () => {
    const d = new Driver();
    d.negotiate(featureBit(VIRTIO_F.VERSION_1) | featureBit(VIRTIO_F.RING_PACKED));
    expect(d.status() & S.FEATURES_OK).toBe(0);
    expect(d.status() & (S.ACKNOWLEDGE | S.DRIVER)).toBe(3);
    d.addStatus(S.DRIVER_OK);
    expect(d.dev.activations).toHaveLength(0);
    expect(d.status() & S.DEVICE_NEEDS_RESET).toBe(S.DEVICE_NEEDS_RESET);

    const e = new Driver();
    e.negotiate(featureBit(VIRTIO_F.EVENT_IDX));
    expect(e.status() & S.FEATURES_OK).toBe(0);
  });

  it("driver features are frozen after FEATURES_OK", () => {
    const d = new Driver();
    d.negotiate(featureBit(VIRTIO_F.VERSION_1));
    d.setDriverFeatures(featureBit(VIRTIO_F.VERSION_1) | featureBit(BLK_SIZE_MAX));
    d.setCommon(COMMON.DRIVER_FEATURE_SELECT, 4, 0);
    expect(d.common(COMMON.DRIVER_FEATURE, 4)).toBe(0);
    d.setCommon(COMMON.DRIVER_FEATURE_SELECT, 4, 1);
    expect(d.common(COMMON.DRIVER_FEATURE, 4)).toBe(1);
    d.setCommon(COMMON.DEVICE_FEATURE_SELECT, 4, 7);
    expect(d.common(COMMON.DEVICE_FEATURE, 4)).toBe(0);
  });

  it("queue_select past num_queues reads size 0 and ignores writes", () => {
    const d = new Driver();
    d.setCommon(COMMON.QUEUE_SELECT, 2, 2);
    expect(d.common(COMMON.QUEUE_SIZE, 2)).toBe(0);
    d.setCommon(COMMON.QUEUE_SIZE, 2, 16);
    d.setCommon(COMMON.QUEUE_ENABLE, 2, 1);
    expect(d.common(COMMON.QUEUE_SIZE, 2)).toBe(0);
    expect(d.common(COMMON.QUEUE_ENABLE, 2)).toBe(0);
    d.setCommon(COMMON.QUEUE_SELECT, 2, 0xffff);
    expect(d.common(COMMON.QUEUE_SIZE, 2)).toBe(0);
  });

  it("MSI-X vectors beyond the table read back NO_VECTOR", () => {
    const d = new Driver();
    d.setCommon(COMMON.CONFIG_MSIX_VECTOR, 2, 3);
    expect(d.common(COMMON.CONFIG_MSIX_VECTOR, 2)).toBe(VIRTIO_MSI_NO_VECTOR);
    d.setCommon(COMMON.QUEUE_MSIX_VECTOR, 2, 2);
    expect(d.common(COMMON.QUEUE_MSIX_VECTOR, 2)).toBe(2);
    d.setCommon(COMMON.QUEUE_MSIX_VECTOR, 2, 0x8000);
    expect(d.common(COMMON.QUEUE_MSIX_VECTOR, 2)).toBe(VIRTIO_MSI_NO_VECTOR);
  });

  it.each([
    ["not a power of two", 100, 0x10000],
    ["above the maximum", 512, 0x10000],
    ["zero", 0, 0x10000],
    ["misaligned descriptor table", 64, 0x10008],
    ["outside guest RAM", 64, MEM_SIZE - 0x100],
  ])("a queue %s sets DEVICE_NEEDS_RESET at DRIVER_OK instead of activating", (_what, size, base) => {
    const d = new Driver();
    d.negotiate();
    d.setCommon(COMMON.CONFIG_MSIX_VECTOR, 2, 0);
    d.setupQueue(0, size, base, 1);
    d.setCommon(COMMON.QUEUE_ENABLE, 2, 1);
    d.addStatus(S.DRIVER_OK);
    expect(d.dev.activations).toHaveLength(0);
    expect(d.status() & S.DEVICE_NEEDS_RESET).toBe(S.DEVICE_NEEDS_RESET);
    expect(d.pci.needsResetReason).toMatch(/queue 0/);
    // §2.1.2: DRIVER_OK was set, so the driver hears about it on the config vector.
    expect(d.sent).toEqual([[0xfee0_0000n, 0x40]]);
    // Kicks are ignored until reset; a reset recovers.
    d.write(VIRTIO_PCI_CAP.NOTIFY_CFG, 0, 2, 0);
    d.pci.queueNotify(0);
    expect(d.dev.notified).toEqual([]);
    d.setCommon(COMMON.DEVICE_STATUS, 1, 0);
    expect(d.status()).toBe(0);
    expect(d.pci.needsResetReason).toBeUndefined();
  });

  it("packed rings may have any size up to the maximum (virtio 1.2 §2.8)", () => {
    const d = new Driver(new FakeDevice(featureBit(VIRTIO_F.VERSION_1) | featureBit(VIRTIO_F.RING_PACKED)));
    d.negotiate();
    d.setupQueue(0, 100, 0x10000, 1);
    d.setCommon(COMMON.QUEUE_ENABLE, 2, 1);
    d.addStatus(S.DRIVER_OK);
    expect(d.dev.activations[0]?.queues[0]?.size).toBe(100);
    expect(d.dev.activations[0]?.queues[1]).toEqual({ size: 0, descAddr: 0, driverAddr: 0, deviceAddr: 0 });
  });

  it("status 0 resets the device and every queue; callbacks of the old activation go dead", () => {
    const d = new Driver();
    d.negotiate();
    d.setCommon(COMMON.CONFIG_MSIX_VECTOR, 2, 0);
    d.setupQueue(0, 64, 0x10000, 1);
    d.setCommon(COMMON.QUEUE_ENABLE, 2, 1);
    d.addStatus(S.DRIVER_OK);
    const ctx = d.dev.activations[0]!;
    const resetsBefore = d.dev.resets;
    d.setCommon(COMMON.DEVICE_STATUS, 1, 0);
    expect(d.dev.resets).toBe(resetsBefore + 1);
    expect(d.status()).toBe(0);
    expect(d.common(COMMON.CONFIG_MSIX_VECTOR, 2)).toBe(VIRTIO_MSI_NO_VECTOR);
    d.setCommon(COMMON.QUEUE_SELECT, 2, 0);
    expect(d.common(COMMON.QUEUE_SIZE, 2)).toBe(256);
    expect(d.common(COMMON.QUEUE_ENABLE, 2)).toBe(0);
    expect(d.common(COMMON.QUEUE_DESC, 4)).toBe(0);
    expect(d.common(COMMON.QUEUE_MSIX_VECTOR, 2)).toBe(VIRTIO_MSI_NO_VECTOR);
    ctx.interruptQueue(0);
    ctx.needsReset("late");
    expect(d.sent).toEqual([]);
    expect(d.status()).toBe(0);
  });

  it("the driver cannot clear status bits or set DEVICE_NEEDS_RESET itself", () => {
    const d = new Driver();
    d.negotiate();
    d.setCommon(COMMON.DEVICE_STATUS, 1, S.ACKNOWLEDGE | S.DEVICE_NEEDS_RESET);
    expect(d.status()).toBe(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
  });

  it("needsReset from the device sets the bit and signals the config vector", () => {
    const d = new Driver();
    d.negotiate();
    d.setCommon(COMMON.CONFIG_MSIX_VECTOR, 2, 0);
    d.addStatus(S.DRIVER_OK);
    d.dev.activations[0]!.needsReset("bad descriptor");
    expect(d.status() & S.DEVICE_NEEDS_RESET).toBe(S.DEVICE_NEEDS_RESET);
    expect(d.pci.needsResetReason).toBe("bad descriptor");
    expect(d.sent).toEqual([[0xfee0_0000n, 0x40]]);
  });
});

describe("ISR, device config, PCI_CFG window", () => {
  it("without MSI-X the ISR records queue and config interrupts and clears on read", () => {
    const d = new Driver();
    d.setCommon(COMMON.DEVICE_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER);
    d.setDriverFeatures(featureBit(VIRTIO_F.VERSION_1));
    d.addStatus(S.FEATURES_OK | S.DRIVER_OK);
    const ctx = d.dev.activations[0]!;
    ctx.interruptQueue(0);
    expect(d.cfgRead(PCI_REG.STATUS, 2) & 0x8).toBe(0x8);
    d.pci.configChanged();
    expect(d.read(VIRTIO_PCI_CAP.ISR_CFG, 0, 1)).toBe(3);
    expect(d.read(VIRTIO_PCI_CAP.ISR_CFG, 0, 1)).toBe(0);
    expect(d.cfgRead(PCI_REG.STATUS, 2) & 0x8).toBe(0);
    expect(d.sent).toEqual([]);
  });

  it("device config passes through at sizes 1/2/4/8 and reads 0 past its end", () => {
    const d = new Driver();
    expect(d.read(VIRTIO_PCI_CAP.DEVICE_CFG, 0, 4)).toBe(0x2000);
    expect(d.read(VIRTIO_PCI_CAP.DEVICE_CFG, 4, 4)).toBe(1);
    const q = new Uint8Array(8);
    d.bus.handleMmio(d.addr(VIRTIO_PCI_CAP.DEVICE_CFG, 0), q, false);
    expect(new DataView(q.buffer).getBigUint64(0, true)).toBe(0x1_0000_2000n);
    expect(d.read(VIRTIO_PCI_CAP.DEVICE_CFG, 10, 4)).toBe(0);
    d.write(VIRTIO_PCI_CAP.DEVICE_CFG, 8, 2, 0xbeef);
    expect(d.read(VIRTIO_PCI_CAP.DEVICE_CFG, 8, 2)).toBe(0xbeef);
  });

  it("VIRTIO_PCI_CAP_PCI_CFG reads and writes BAR registers through config space (§4.1.4.9)", () => {
    const d = new Driver();
    const cap = d.caps.get(VIRTIO_PCI_CAP.PCI_CFG)!.extra;
    const common = d.caps.get(VIRTIO_PCI_CAP.COMMON_CFG)!;
    d.cfgWrite(cap + 4, 1, VIRTIO_BAR);
    d.cfgWrite(cap + 8, 4, common.offset + COMMON.NUM_QUEUES);
    d.cfgWrite(cap + 12, 4, 2);
    expect(d.cfgRead(cap + 16, 4)).toBe(2);
    d.cfgWrite(cap + 8, 4, common.offset + COMMON.QUEUE_SELECT);
    d.cfgWrite(cap + 16, 2, 1);
    expect(d.common(COMMON.QUEUE_SELECT, 2)).toBe(1);
    // Misaligned or odd lengths do nothing.
    d.cfgWrite(cap + 8, 4, common.offset + COMMON.QUEUE_SELECT + 1);
    d.cfgWrite(cap + 16, 2, 0);
    d.cfgWrite(cap + 12, 4, 3);
    d.cfgWrite(cap + 16, 4, 0);
    expect(d.common(COMMON.QUEUE_SELECT, 2)).toBe(1);
  });
});

describe("hostile guests (fast-check)", () => {
  const commonOffsets = Object.values(COMMON).filter((o) => o < COMMON.LENGTH);
  const op = fc.oneof(
    // Structured common-config writes, so activation is actually reached.
    { weight: 6, arbitrary: fc.tuple(fc.constant("common" as const), fc.constantFrom(...commonOffsets), fc.constantFrom(1, 2, 4, 8), fc.oneof(fc.integer({ min: 0, max: 0xffff_ffff }), fc.constantFrom(0, 1, 2, 4, 8, 15, 16, 64, 128, 256, 0xffff, 0x10000))) },
    { weight: 2, arbitrary: fc.tuple(fc.constant("bar4" as const), fc.integer({ min: 0, max: 0x4008 }), fc.constantFrom(1, 2, 3, 4, 8), fc.integer({ min: 0, max: 0xffff_ffff })) },
    { weight: 1, arbitrary: fc.tuple(fc.constant("bar1" as const), fc.integer({ min: 0, max: 0x1008 }), fc.constantFrom(1, 2, 4, 8), fc.integer({ min: 0, max: 0xffff_ffff })) },
    { weight: 2, arbitrary: fc.tuple(fc.constant("cfg" as const), fc.integer({ min: 0, max: 0x1007 }), fc.constantFrom(1, 2, 4, 8), fc.integer({ min: 0, max: 0xffff_ffff })) },
  );

  const script = fc.record({
    features: fc.oneof(fc.constant(featureBit(VIRTIO_F.VERSION_1)), fc.constant(featureBit(VIRTIO_F.VERSION_1) | featureBit(BLK_SIZE_MAX)), fc.bigInt({ min: 0n, max: (1n << 64n) - 1n })),
    queues: fc.array(
      fc.record({
        q: fc.integer({ min: 0, max: 2 }),
        size: fc.oneof({ weight: 3, arbitrary: fc.constantFrom(0, 1, 2, 16, 100, 128, 200, 256, 512, 0xffff) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffff }) }),
        desc: fc.oneof({ weight: 3, arbitrary: fc.constantFrom(0x1000, 0x20000) }, { weight: 1, arbitrary: fc.constantFrom(0, 0x10008, MEM_SIZE - 16, 2 ** 40) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: 2 * MEM_SIZE }) }),
        enable: fc.oneof({ weight: 3, arbitrary: fc.constant(true) }, { weight: 1, arbitrary: fc.constant(false) }),
      }),
      { maxLength: 3 },
    ),
    driverOk: fc.oneof({ weight: 3, arbitrary: fc.constant(true) }, { weight: 1, arbitrary: fc.constant(false) }),
  });

  it("random accesses never throw, keep the IDs, and never activate an invalid queue", () => {
    let activations = 0;
    fc.assert(
      fc.property(script, fc.array(fc.tuple(op, fc.boolean()), { maxLength: 80 }), (sc, ops) => {
        const d = new Driver();
        // A driver that follows the steps with hostile values, so DRIVER_OK is often reached.
        d.setCommon(COMMON.DEVICE_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER);
        d.setDriverFeatures(sc.features);
        d.addStatus(S.FEATURES_OK);
        for (const q of sc.queues) {
          d.setCommon(COMMON.QUEUE_SELECT, 2, q.q);
          d.setCommon(COMMON.QUEUE_SIZE, 2, q.size);
          for (const [off, a] of [
            [COMMON.QUEUE_DESC, q.desc],
            [COMMON.QUEUE_DRIVER, q.desc + 0x1000 * 16],
            [COMMON.QUEUE_DEVICE, q.desc + 0x1000 * 20],
          ] as const) {
            d.setCommon(off, 4, a % 2 ** 32);
            d.setCommon(off + 4, 4, Math.floor(a / 2 ** 32) % 2 ** 32);
          }
          if (q.enable) d.setCommon(COMMON.QUEUE_ENABLE, 2, 1);
        }
        if (sc.driverOk) d.addStatus(S.DRIVER_OK);
        const bar4 = d.barBase(VIRTIO_BAR);
        const bar1 = d.barBase(MSIX_BAR);
        for (const [[kind, off, size, v], isWrite] of ops) {
          const data = new Uint8Array(size);
          for (let i = 0; i < size; i++) data[i] = Math.floor(v / 2 ** (8 * (i % 4))) & 0xff;
          const addr =
            kind === "common"
              ? d.addr(VIRTIO_PCI_CAP.COMMON_CFG, off)
              : kind === "bar4"
                ? bar4 + off
                : kind === "bar1"
                  ? bar1 + off
                  : PCI_ECAM_START + (d.slot << 15) + off;
          // Common-config writes are always writes; the rest mix reads and writes.
          d.bus.handleMmio(addr, data, kind === "common" || isWrite);
        }
        expect(d.cfgRead(0, 4)).toBe(0x1042_1af4);
        expect(d.cfgRead(PCI_REG.REVISION_ID, 4)).toBe(0x0180_0001);
        activations += d.dev.activations.length;
        for (const ctx of d.dev.activations) {
          ctx.queues.forEach((q, i) => {
            if (q.size === 0) return;
            expect(q.size).toBeLessThanOrEqual(d.dev.queueMaxSizes[i]!);
            expect(q.size & (q.size - 1)).toBe(0);
            expect(d.mem.contains(q.descAddr, 16 * q.size)).toBe(true);
            expect(d.mem.contains(q.deviceAddr, 6 + 8 * q.size)).toBe(true);
          });
        }
      }),
      { numRuns: 300 },
    );
    // The generator does reach DRIVER_OK with valid queues sometimes, so the checks above ran.
    expect(activations).toBeGreaterThan(0);
  });

  it("activation is reachable by the same generator (the property above is not vacuous)", () => {
    // A fixed sequence in the generator's alphabet: status bits, features, queue 0 setup, DRIVER_OK.
    const d = new Driver();
    const w = (off: number, size: number, v: number): void => d.setCommon(off, size, v);
    w(COMMON.DEVICE_STATUS, 1, 3);
    w(COMMON.DRIVER_FEATURE_SELECT, 4, 1);
    w(COMMON.DRIVER_FEATURE, 4, 1);
    w(COMMON.DEVICE_STATUS, 1, 8);
    w(COMMON.QUEUE_SIZE, 2, 16);
    w(COMMON.QUEUE_ENABLE, 2, 1);
    w(COMMON.DEVICE_STATUS, 1, 4);
    expect(d.dev.activations).toHaveLength(1);
    expect(d.dev.activations[0]!.queues[0]).toEqual({ size: 16, descAddr: 0, driverAddr: 0, deviceAddr: 0 });
  });
});

describe("inspect (GET /threads)", () => {
  it("shows status bits, ISR, vectors (masked, pending) and each queue's registers, and changes nothing", () => {
    const d = new Driver();
    expect(d.pci.inspect()).toMatchObject({ status: 0, statusBits: [], needsReset: null, isr: 0, configVector: null, msix: { enabled: false } });
    d.negotiate();
    d.setCommon(COMMON.CONFIG_MSIX_VECTOR, 2, 0);
    d.setupQueue(0, 128, 0x10000, 1);
    d.setCommon(COMMON.QUEUE_ENABLE, 2, 1);
    d.addStatus(S.DRIVER_OK);
    // The guest masks vector 1 (vector control, table entry 1): the queue's interrupt waits in the PBA.
    const mask = new Uint8Array(4);
    mask[0] = 1;
    d.bus.handleMmio(d.barBase(MSIX_BAR) + 16 + 12, mask, true);
    const ctx = d.dev.activations[0]!;
    ctx.interruptQueue(0);
    ctx.interruptConfig();
    const seen = d.pci.inspect();
    expect(seen).toMatchObject({
      status: S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK,
      statusBits: ["ACKNOWLEDGE", "DRIVER", "DRIVER_OK", "FEATURES_OK"],
      needsReset: null,
      isr: 2,
      msix: { enabled: true, functionMasked: false },
      configVector: { vector: 0, masked: false, pending: false },
    });
    expect(BigInt(seen.features)).toBe(d.deviceFeatures());
    // FakeDevice has no inspect(): the transport's registers only.
    expect(seen.queues).toEqual([
      { index: 0, enabled: true, size: 128, vector: { vector: 1, masked: true, pending: true }, active: false },
      { index: 1, enabled: false, size: 128, vector: null, active: false },
    ]);
    // Nothing was cleared or delivered by looking: the guest's own ISR read still sees it.
    expect(d.pci.inspect().isr).toBe(2);
    expect(d.read(VIRTIO_PCI_CAP.ISR_CFG, 0, 1)).toBe(2);
    expect(d.sent).toEqual([[0xfee0_0000n, 0x40]]);
  });

  it("adds the device's own view of each queue it built", () => {
    // A real device with inspect(); the Driver reads only the transport (its FakeDevice fields go unused here).
    const d = new Driver(new RngDevice() as unknown as FakeDevice);
    d.negotiate();
    d.setupQueue(0, 64, 0x10000, 1);
    d.setCommon(COMMON.QUEUE_ENABLE, 2, 1);
    d.addStatus(S.DRIVER_OK);
    expect(d.pci.inspect().queues[0]).toMatchObject({ index: 0, enabled: true, size: 64, active: true, nextAvail: 0, availIdx: 0, waiting: 0, usedIdx: 0, broken: null });
  });
});
