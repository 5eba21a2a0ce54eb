/**
 * The device thread as the VMM runs it (a worker from dist/, over a real KVM VM fd and guest
 * memory mapped in this process), driven the way vCPUs drive it: configuration and BAR accesses
 * through the mailbox. No vCPU runs: this test plays the guest's drivers itself. It takes a
 * snapshot with the "snapshot" command, stops the thread, starts a new one with `restore`, and
 * the guest's disk driver continues on the new thread.
 */
import { StatsPage } from "../../stats/page.js";
import { copyFileSync, existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Worker } from "node:worker_threads";
import { afterAll, describe, expect, it } from "vitest";
import { Kvm } from "../../../kvm/kvm.js";
import { PCI_ECAM_START } from "../../arch/x86_64/layout.js";
import * as libc from "../../../sys/libc.js";
import type { DeviceSpecs } from "../../device-specs.js";
import { GuestMemory, type HostRegion } from "../../memory/guest-memory.js";
import { createBoard } from "../../threads/board.js";
import { prestartWorkers, rehearseWorkers, spawnWorker } from "../../threads/spawn.js";
import { workerUrl } from "../../worker-url.js";
import { PCI_SLOTS } from "../pci/bus.js";
import { VIRTIO_BLK_S, VIRTIO_BLK_T } from "../virtio/block/block.js";
import { featureBit, VIRTIO_F } from "../virtio/device.js";
import { COMMON, VIRTIO_STATUS as S } from "../virtio/pci/caps.js";
import { PciDriver, type MmioTarget } from "../virtio/pci/test-pci-driver.js";
import { QueueDriver } from "../virtio/queue/driver.js";
import type { DeviceReplies, DeviceRequest, DeviceThreadInit, DeviceThreadMessage, DevicesState } from "./device-thread-init.js";
import { createMailbox, MailboxClient, Op } from "./mailbox.js";

const hasKvm = existsSync("/dev/kvm");
if (hasKvm && !existsSync(new URL("../../../../dist/vmm/devices/platform/device-thread.js", import.meta.url))) throw new Error("run `npm run build` first: the device thread loads from dist/");

const MEM = 4 << 20;
const SECTOR = 512;
const dir = mkdtempSync(join(tmpdir(), "tv-devthread-"));
const kvm = hasKvm ? new Kvm() : undefined;
const vm = kvm?.createVm();
// Guest RAM: one anonymous mapping, shared with the device threads through its host address;
// unmapped only after every thread using it has exited (afterAll runs after the tests awaited that).
const ram = libc.mmap(MEM, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS);
const regions: HostRegion[] = [{ guestPhysAddr: 0, size: MEM, hostAddress: Number(ram.address) }];
const mem = GuestMemory.mapped(regions);
afterAll(() => {
  vm?.close();
  kvm?.close();
  libc.munmap(ram);
  rmSync(dir, { recursive: true, force: true });
});

/** One device thread, as Vm.startDevices starts it. */
class DeviceThread {
  private readonly worker: Worker;
  private readonly eventfd = libc.eventfd();
  private readonly control = new SharedArrayBuffer(4);
  private readonly mailbox = createMailbox(1);
  private seq = 0;
  private readonly replies = new Map<number, (m: DeviceThreadMessage) => void>();
  /** The first "ready" or "error" message. */
  readonly started: Promise<DeviceThreadMessage>;
  private readonly exited: Promise<void>;

  /**
   * `rehearse`: the thread is started ahead of need, as a standby starts it (threads/spawn.ts), and
   * given these samples to rehearse with before its init.
   */
  constructor(devices: DeviceSpecs, restore?: unknown, rehearse?: unknown[]) {
    const init: DeviceThreadInit = {
      vmFd: vm!.fd,
      memory: regions,
      mailbox: this.mailbox,
      eventfd: this.eventfd,
      vcpus: 1,
      devices,
      control: this.control,
      board: createBoard(1),
      statsPage: StatsPage.create().ref,
      ...(restore !== undefined ? { restore: restore as DevicesState } : {}),
    };
    if (rehearse !== undefined) {
      // Taken at once, while it still starts (as a `run` takes its early threads): the samples
      // and then the init wait on its channel, in that order, until it looks.
      void prestartWorkers("devices/platform/device-thread.js", 1);
      for (const sample of rehearse) rehearseWorkers("devices/platform/device-thread.js", sample);
      this.worker = spawnWorker("devices/platform/device-thread.js", init);
    } else this.worker = new Worker(workerUrl("devices/platform/device-thread.js"), { workerData: init });
    this.started = new Promise((resolve) => {
      this.worker.on("message", (m: DeviceThreadMessage) => {
        if (m.type === "reply") this.replies.get(m.id)?.(m);
        else if (m.type === "ready" || m.type === "error") resolve(m);
      });
      this.worker.on("error", (e) => resolve({ type: "error", code: "WORKER", message: e.message }));
      this.worker.on("exit", (code) => resolve({ type: "error", code: "EXIT", message: `exited ${code}` }));
    });
    this.exited = new Promise((resolve) => this.worker.once("exit", () => resolve()));
  }

  async command<R extends DeviceRequest>(request: R): Promise<DeviceReplies[R["command"]]> {
    const id = ++this.seq;
    const reply = new Promise<DeviceThreadMessage>((resolve) => this.replies.set(id, resolve));
    this.worker.postMessage({ ...request, type: "command", id });
    libc.eventfdSignal(this.eventfd);
    const m = await reply;
    if (m.type !== "reply" || !m.ok) throw new Error(`command failed: ${JSON.stringify(m)}`);
    return m.result as DeviceReplies[R["command"]];
  }

  /** The guest's MMIO accesses, as a vCPU makes them: through the mailbox, one access at a time. */
  readonly mmio: MmioTarget = {
    handleMmio: (addr, data, isWrite) => {
      const client = new MailboxClient(this.mailbox, 0, this.eventfd);
      let v = 0n;
      if (isWrite) {
        for (let i = data.length - 1; i >= 0; i--) v = (v << 8n) | BigInt(data[i]!);
        client.call(Op.MMIO_WRITE, addr, data.length, v);
      } else {
        v = client.call(Op.MMIO_READ, addr, data.length, 0n);
        for (let i = 0; i < data.length; i++) data[i] = Number((v >> BigInt(8 * i)) & 0xffn);
      }
      return true;
    },
  };

  async stop(): Promise<void> {
    Atomics.store(new Int32Array(this.control), 0, 1);
    libc.eventfdSignal(this.eventfd);
    await this.exited;
    libc.close(this.eventfd);
  }
}

function image(name: string): string {
  const path = join(dir, name);
  const b = Buffer.alloc(64 * SECTOR);
  for (let n = 0; n < 64; n++) b.fill(n + 1, n * SECTOR, (n + 1) * SECTOR);
  writeFileSync(path, b);
  return path;
}

/** The slot of each device, found as a guest does: vendor 1af4 at each slot's ECAM page. */
function virtioSlots(t: MmioTarget): number[] {
  const slots: number[] = [];
  for (let s = 1; s < PCI_SLOTS; s++) {
    const id = new Uint8Array(2);
    t.handleMmio(PCI_ECAM_START + (s << 15), id, false);
    if (id[0] === 0xf4 && id[1] === 0x1a) slots.push(s);
  }
  return slots;
}

function readSector(d: PciDriver, q: QueueDriver, sector: number): number {
  mem.writeU32(0x300000, VIRTIO_BLK_T.IN);
  mem.writeU64(0x300008, BigInt(sector));
  mem.writeU8(0x302000, 0xee);
  q.publish(q.addChain([{ addr: 0x300000, len: 16 }, { addr: 0x301000, len: SECTOR, write: true }, { addr: 0x302000, len: 1, write: true }]));
  d.kick(0);
  // The device thread serves the kick on its own; poll the used ring as a guest's interrupt handler would find it.
  const deadline = Date.now() + 10_000;
  while (q.usedIdx === 0 || mem.readU8(0x302000) === 0xee) {
    if (Date.now() > deadline) throw new Error("the disk did not answer in 10 s");
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 5);
  }
  expect(mem.readU8(0x302000)).toBe(VIRTIO_BLK_S.OK);
  return mem.readU8(0x301000);
}

describe.skipIf(!hasKvm)("device thread snapshot and restore (real worker, KVM VM fd, mailbox)", () => {
  it("the snapshot command saves a live disk and rng; a new thread restored from it continues the guest's ring", async () => {
    const disk = image("a.img");
    const specs = (path: string): DeviceSpecs => ({ disks: [{ path, readonly: false }], nets: [], rng: true });
    const a = new DeviceThread(specs(disk));
    expect(await a.started).toMatchObject({ type: "ready" });
    const slots = virtioSlots(a.mmio);
    expect(slots).toHaveLength(2);
    const blk = new PciDriver(a.mmio, slots[0]!);
    const q = new QueueDriver(mem, 16, 0x10000);
    blk.enableMsix(2);
    blk.setCommon(COMMON.DEVICE_STATUS, 1, 0);
    blk.addStatus(S.ACKNOWLEDGE | S.DRIVER);
    blk.setDriverFeatures(blk.deviceFeatures() & ~featureBit(VIRTIO_F.EVENT_IDX));
    blk.addStatus(S.FEATURES_OK);
    blk.placeQueue(0, q.config, 1);
    blk.addStatus(S.DRIVER_OK);
    expect(readSector(blk, q, 7)).toBe(8);

    const state = await a.command({ command: "snapshot" });
    expect(state.devices.map((d) => d.kind)).toEqual(["block", "rng"]);
    expect(state.devices[0]!.device).toMatchObject({ activated: true, queues: [{ nextAvail: 1, nextUsed: 1 }] });
    // The devices keep working after a snapshot (the VM may resume).
    expect(readSector(blk, q, 8)).toBe(9);
    const again = await a.command({ command: "snapshot" });
    await a.stop();

    // A clone with its own copy of the disk; the state through JSON as a file would carry it. Its
    // thread started ahead, as a standby's, and rehearsed first with garbage (ignored) and with
    // the state itself (checked, nothing built from it).
    const clone = join(dir, "clone.img");
    copyFileSync(disk, clone);
    const b = new DeviceThread(specs(clone), JSON.parse(JSON.stringify(again)), [{ bogus: 1 }, JSON.parse(JSON.stringify(again))]);
    expect(await b.started).toMatchObject({ type: "ready" });
    const blk2 = new PciDriver(b.mmio, slots[0]!);
    expect(blk2.status()).toBe(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK);
    blk2.setCommon(COMMON.QUEUE_SELECT, 2, 0);
    expect(blk2.common(COMMON.QUEUE_MSIX_VECTOR, 2)).toBe(1);
    expect(readSector(blk2, q, 9)).toBe(10);
    expect(q.takeUsed().map((u) => u.len)).toEqual([SECTOR + 1, SECTOR + 1, SECTOR + 1]);
    await b.stop();

    // Other devices than the snapshot's: SNAPSHOT_MISMATCH before "ready"; garbage: SNAPSHOT_INVALID.
    const c = new DeviceThread({ disks: [{ path: clone, readonly: false }], nets: [], rng: false }, again);
    expect(await c.started).toMatchObject({ type: "error", code: "SNAPSHOT_MISMATCH" });
    await c.stop();
    const d = new DeviceThread(specs(clone), { ...again, version: 7 });
    expect(await d.started).toMatchObject({ type: "error", code: "SNAPSHOT_INVALID" });
    await d.stop();
  });
});
