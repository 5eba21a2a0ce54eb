/**
 * The device thread: owns the PCI bus, the virtio-pci transports and the
 * device back ends (disk I/O, entropy), off every vCPU thread and off the main
 * thread. It sleeps in poll(2) on one eventfd for vCPU mailbox requests (PCI
 * configuration and BAR register accesses) plus one ioeventfd per virtqueue,
 * so a guest's queue kick costs the vCPU no exit to userspace at all
 * (KVM API §4.59 KVM_IOEVENTFD); completions are signalled with KVM_SIGNAL_MSI.
 */
import { parentPort, receiveMessageOnPort } from "node:worker_threads";
import { isTypevisorError, TypevisorError } from "../../../errors.js";
import { VmFd } from "../../../kvm/kvm.js";
import * as libc from "../../../sys/libc.js";
import { PORT } from "../../arch/x86_64/layout.js";
import { DirtyLog, GuestMemory } from "../../memory/guest-memory.js";
import { PciBus, type BarDecode } from "../pci/bus.js";
import { BlockDevice } from "../virtio/block/block.js";
import type { VirtioDevice } from "../virtio/device.js";
import { VirtioPciDevice } from "../virtio/pci/transport.js";
import { RngDevice } from "../virtio/rng/rng.js";
import { BALLOON_PAGE_SIZE, BalloonDevice } from "../virtio/balloon/balloon.js";
import { makeDiscard } from "../virtio/balloon/discard.js";
import { VsockDevice } from "../virtio/vsock/vsock.js";
import { formatMac, macFromIdentity, parseMac } from "../virtio/net/mac.js";
import { NetDevice } from "../virtio/net/net.js";
import { adoptTap, openTap, setLinkUp } from "../../../sys/tap.js";
import { boardRow, clockMs, deviceRow, deviceWord, enterStamped, PHASE, SLOT, WORD } from "../../threads/board.js";
import type { DeviceCommand, DeviceReplies, DeviceRequest, DeviceThreadInit, DeviceThreadMessage } from "./device-thread-init.js";
import { MailboxServer, Op, type OpCode } from "./mailbox.js";
import { DirtyBlocks } from "../../disk/dirty-blocks.js";
import { restoreDevices, restoreDevicesThen, saveDevices, type DeviceKind } from "./snapshot.js";
import { endPrestarted, prestartedCount, prestartWorkers, workerInit } from "../../threads/spawn.js";
import { tracingPhases } from "../../phases.js";
import { startProfile, stopProfile } from "../../profile.js";
import { writeSync } from "node:fs";
import { StatsPage } from "../../stats/page.js";

// Started ahead of need (a standby VMM, which only ever restores): the state's checker loads, and
// a disk's I/O thread starts, while it waits for its VM; a standby built for a template hands it
// that snapshot's device state to check meanwhile, so the checker's first, slow run is not the
// restore's (in the lab 0.2 s of a clone's: docs/benchmarks.md).
const init = await workerInit<DeviceThreadInit>(
  () => Promise.all([import("./snapshot-schema.js"), prestartWorkers("devices/virtio/block/io-worker.js", 1)]),
  async (sample) => void (await import("./snapshot-schema.js")).parseDevicesState(sample),
);
/**
 * The device state's checker, for a thread that restores (now, or later by command); its
 * schemas load zod, which a thread that boots a VM fresh does not need (snapshot-schema.ts).
 */
const parseDevicesState = init.restore !== undefined || init.deferRestore === true ? (await import("./snapshot-schema.js")).parseDevicesState : undefined;
/** parseDevicesState where this thread was started to restore; an error anywhere else. */
function checkedState(x: unknown): ReturnType<NonNullable<typeof parseDevicesState>> {
  if (parseDevicesState === undefined) throw new TypevisorError("VM_STATE", "this device thread was not started to restore a state");
  return parseDevicesState(x);
}
const port = parentPort;
if (port === null) throw new Error("device thread started outside a worker thread");
const post = (m: DeviceThreadMessage): void => port.postMessage(m);
// Where this thread is, for GET /threads (threads/board.ts): "starting" (set by the VMM) until the loop runs.
const row = boardRow(init.board, deviceRow(init.vcpus));
Atomics.store(row.i32, WORD.TID, libc.gettid());

const vm = new VmFd(init.vmFd);
const stop = new Int32Array(init.control);
const mem = GuestMemory.mapped(init.memory);
if (init.dirtyLog !== undefined) mem.dirtyLog = new DirtyLog(init.dirtyLog);
const mailbox = new MailboxServer(init.mailbox, init.vcpus);

interface Plugged {
  name: string;
  kind: DeviceKind;
  /** Index on the bus in plug order (what the thread board's state word names). */
  index: number;
  transport: VirtioPciDevice;
  slot: number;
  /** One ioeventfd per queue, registered while the notify BAR decodes. */
  kicks: { queue: number; fd: number; addr: number | undefined }[];
}

const bus = new PciBus();
const taps: number[] = [];
let balloon: BalloonDevice | undefined;
let vsock: VsockDevice | undefined;
const plugged: Plugged[] = [];
/** Disks and NICs in order: disk `i` and NIC `i` count into slot `i` of the stats page. */
const disks: { name: string; dev: BlockDevice }[] = [];
const nics: { name: string; dev: NetDevice }[] = [];
const statsPage = StatsPage.attach(init.statsPage);

function plug(name: string, kind: DeviceKind, device: VirtioDevice): void {
  const transport = new VirtioPciDevice({
    device,
    mem,
    deliverMsi: (addressLo, addressHi, data) => {
      try {
        vm.signalMsi(addressLo, addressHi, data);
      } catch {
        // The guest can program nonsense MSI addresses; KVM refuses them and the interrupt is lost, as on hardware.
      }
    },
  });
  const slot = bus.addDevice(transport);
  const kicks = device.queueMaxSizes.map((_, queue) => ({ queue, fd: libc.eventfd(), addr: undefined as number | undefined }));
  plugged.push({ name, kind, index: plugged.length, transport, slot, kicks });
}

/** Move each queue's ioeventfd to wherever the guest placed the notify BAR (or drop it while it does not decode). */
function routeKicks(): void {
  for (const p of plugged) {
    for (const k of p.kicks) {
      const n = p.transport.notifyAddress(k.queue);
      const base = n === undefined ? undefined : bus.barAddress(p.slot, n.bar);
      const addr = n === undefined || base === undefined ? undefined : base + n.offset;
      if (addr === k.addr) continue;
      if (k.addr !== undefined) vm.ioeventfd(k.addr, 0, k.fd, true);
      k.addr = undefined;
      if (addr !== undefined) {
        // len 0: match any write size at that address (KVM API §4.59).
        vm.ioeventfd(addr, 0, k.fd);
        k.addr = addr;
      }
    }
  }
}

const ones = (size: number): bigint => (1n << BigInt(size * 8)) - 1n;

function handle(op: OpCode, addr: number, size: number, data: bigint): bigint {
  switch (op) {
    case Op.PIO_READ:
      return BigInt(bus.pio.read(addr - PORT.PCI_CONFIG_ADDRESS, size) >>> 0);
    case Op.PIO_WRITE:
      bus.pio.write(addr - PORT.PCI_CONFIG_ADDRESS, size, Number(data & 0xffff_ffffn));
      return 0n;
    case Op.MMIO_READ: {
      const buf = new Uint8Array(size);
      if (!bus.handleMmio(addr, buf, false)) return ones(size);
      let v = 0n;
      for (let i = size - 1; i >= 0; i--) v = (v << 8n) | BigInt(buf[i]!);
      return v;
    }
    case Op.MMIO_WRITE: {
      const buf = new Uint8Array(size);
      let v = data;
      for (let i = 0; i < size; i++) {
        buf[i] = Number(v & 0xffn);
        v >>= 8n;
      }
      bus.handleMmio(addr, buf, true);
      return 0n;
    }
  }
  return 0n;
}

try {
  init.devices.disks.forEach((d, i) => {
    // Each disk's file I/O runs on its own thread (tv-blkN), so a slow disk stalls only itself.
    // It starts when the disk first needs it and ends after idling (an isolate is ~8 MiB of the
    // VMM's own memory); a standby's, started ahead, is already paid for and taken at once.
    const dev = new BlockDevice({
      path: d.path,
      readonly: d.readonly,
      ioThread: `tv-blk${i}`,
      ioThreadStart: prestartedCount("devices/virtio/block/io-worker.js") > 0 ? "eager" : "on-demand",
      // A full host filesystem pauses the VM (QEMU's werror=enospc) instead of failing the guest's write.
      onNoSpace: (info) => post({ type: "no-space", disk: i, ...info }),
      counters: statsPage.disk(i),
      ...(d.format !== undefined ? { format: d.format } : {}),
      ...(d.serial !== undefined ? { serial: d.serial } : {}),
    });
    const name = `virtio-blk ${d.path}${d.format === "qcow2" ? " (qcow2)" : ""}${d.readonly ? " (read-only)" : ""}`;
    plug(name, "block", dev);
    disks.push({ name, dev });
  });
  init.devices.nets.forEach((n, i) => {
    const tap = n.fd !== undefined ? adoptTap(n.fd, n.tap) : openTap(n.tap);
    taps.push(tap.fd);
    // A TAP we just created starts down and would drop what the guest sends.
    if (tap.created) setLinkUp(tap.name);
    const mac = n.mac !== undefined ? parseMac(n.mac) : macFromIdentity(`${tap.name}/net${i}`);
    const dev = new NetDevice({ tapFd: tap.fd, mac, counters: statsPage.nic(i) });
    const name = `virtio-net ${tap.name} ${formatMac(mac)}`;
    plug(name, "net", dev);
    nics.push({ name, dev });
  });
  if (init.devices.rng) plug("virtio-rng", "rng", new RngDevice());
  if (init.devices.vsock !== undefined) {
    vsock = new VsockDevice({ guestCid: init.devices.vsock.cid, udsPath: init.devices.vsock.uds });
    plug(`virtio-vsock cid=${init.devices.vsock.cid} ${init.devices.vsock.uds}`, "vsock", vsock);
  }
  if (init.devices.balloon !== undefined) {
    const discard = makeDiscard(init.memory);
    balloon = new BalloonDevice({
      // A discarded page reads back as zeros (or, restored from a snapshot, as the file's page):
      // its content changed without a guest write, so a migration or an incremental snapshot must send it again.
      discard: (gpa, len) => {
        discard(gpa, len);
        mem.dirtyLog?.mark(gpa, len);
      },
      maxPages: Math.floor(mem.size / BALLOON_PAGE_SIZE),
      statsPollSeconds: init.devices.balloon.statsPollSeconds,
      deflateOnOom: init.devices.balloon.deflateOnOom,
    });
    plug("virtio-balloon", "balloon", balloon);
  }
  bus.onDecodeChange((_changes: BarDecode[]) => routeKicks());
  // Checked again here (the main thread parsed it too): this thread trusts no state it did not check.
  if (init.restore !== undefined) restoreDevices(plugged, bus, checkedState(init.restore));
  // The state's checker is slow the first time (schema set-up: ~100 ms on a loaded host, far more
  // in the lab) and fast afterwards, and so is the restore's own code (the lab, in a migration's
  // pause: the transports' restore ~20 ms, the bus's decode rebuild ~100 ms): run both now, off the
  // guest's pause, on these never-run devices' own state. Putting a fresh device's own state back
  // changes nothing (the same registers, BARs where they are, no device live); the real restore
  // resets each transport first anyway. Only a warm-up: whatever it finds is ignored.
  if (init.deferRestore === true) {
    try {
      restoreDevices(plugged, bus, checkedState(saveDevices(plugged, bus)));
    } catch {
      // the restore that counts reports its own problems
    }
    // A never-run NIC's state is not live, so the above leaves its queue code cold: that code
    // (its live restore in the pause, the first look at the queues after it) runs once here on
    // scratch memory (net/rehearse.ts, loaded only here: a booting VM has no use for it), and
    // the checker sees a live NIC's state (the queues' schemas, which a never-run device's
    // empty queue list never reaches).
    if (nics.length > 0) {
      const t = performance.now();
      try {
        const live = (await import("../virtio/net/rehearse.js")).rehearseNet().state;
        const sample = saveDevices(plugged, bus);
        checkedState({ ...sample, devices: sample.devices.map((d) => (d.kind === "net" ? { ...d, device: live } : d)) });
        if (tracingPhases) writeSync(2, `typevisor: device thread: network queue code rehearsed in ${(performance.now() - t).toFixed(1)} ms\n`);
      } catch (e) {
        // Only a warm-up, but one that failed warmed less: said where phases are traced.
        if (tracingPhases) writeSync(2, `typevisor: device thread: the network rehearsal failed: ${(e as Error).message}\n`);
      }
    }
  }
  routeKicks();
} catch (e) {
  post(isTypevisorError(e) ? { type: "error", code: e.code, message: e.message } : { type: "error", code: "DEVICE_SETUP", message: (e as Error).message });
  process.exit(1);
}
// Named so per-thread CPU (/proc/PID/task/TID/comm) tells this thread from V8's and the vCPUs'.
libc.pthreadSetName(libc.pthreadSelf(), "tv-devices");
// An I/O thread started ahead that no disk took (no disk, or one served on this thread).
endPrestarted();
post({
  type: "ready",
  devices: plugged.map((p) => `${p.name} at 00:${p.slot.toString(16).padStart(2, "0")}.0`),
  // The main thread reads each I/O thread's ring itself (GET /threads), so it sees a disk's I/O even while this thread is stuck.
  disks: disks.map(({ name, dev }) => ({ name, ioThread: dev.ioThreadRing ?? null })),
  nets: nics.map(({ name }) => name),
});

function theBalloon(): BalloonDevice {
  if (balloon === undefined) throw new TypevisorError("NO_BALLOON", "this VM has no balloon (start it with --balloon)");
  return balloon;
}
function balloonState(): DeviceReplies["balloon.stats"] {
  const b = theBalloon();
  return { targetPages: b.targetPages(), actualPages: b.actualPages(), ...b.stats(), counters: b.counters() };
}

/** Where every device and queue stands, and each disk's I/O thread as this thread sees it (GET /threads). */
function threadsReport(): DeviceReplies["threads"] {
  return {
    devices: plugged.map((p) => ({ name: p.name, slot: p.slot, ...p.transport.inspect() })),
    disks: disks.map(({ name, dev }) => ({ name, ioThread: dev.stats().ioThread, inFlight: dev.inFlight })),
  };
}

const stallWord = new Int32Array(new SharedArrayBuffer(4));
/** Whether the deferred state (DeviceThreadInit.deferRestore) was put in place by "restore". */
let restored = false;

/**
 * Before a snapshot (vCPUs paused): serve every queue kick already signalled on its ioeventfd, so
 * what the guest published and notified before it stopped is taken now rather than found by
 * the restore's look at every queue; disks then complete what is in flight in their save().
 */
function quiesce(): void {
  mailbox.serve({ handle });
  for (const p of plugged) {
    for (const k of p.kicks) if (libc.eventfdDrain(k.fd) > 0) p.transport.queueNotify(k.queue);
  }
}

/** Host-side verbs; each returns plain data (DeviceReplies). */
function runCommand(c: DeviceRequest): DeviceReplies[DeviceRequest["command"]] {
  switch (c.command) {
    case "devices":
      return plugged.map((p) => ({ name: p.name, slot: p.slot, status: p.transport.deviceStatus, needsReset: p.transport.needsResetReason ?? null }));
    case "threads":
      return threadsReport();
    case "balloon.setTarget":
      if (typeof c.args.pages !== "number") throw new TypevisorError("INVALID_REQUEST", "balloon.setTarget needs {pages}");
      theBalloon().setTarget(c.args.pages);
      return balloonState();
    case "balloon.requestStats":
      return { requested: theBalloon().requestStats() };
    case "balloon.stats":
      return balloonState();
    case "snapshot":
      quiesce();
      return saveDevices(plugged, bus);
    case "dirtyLog":
      // Set between requests (commands run on this thread between passes), so no write is half-marked.
      mem.dirtyLog = c.args.buffer === null ? undefined : new DirtyLog(c.args.buffer);
      return { on: mem.dirtyLog !== undefined };
    case "restore":
      if (init.deferRestore !== true || restored) throw new TypevisorError("VM_STATE", "this device thread's state was put in place already");
      {
        // Checked here as the init's restore is: this thread trusts no state it did not check.
        // With TYPEVISOR_TRACE_PHASES=1, how long the check and each step of the restore took.
        startProfile();
        const steps: string[] = [];
        let t = performance.now();
        const step = (done: string): void => {
          const now = performance.now();
          steps.push(`${done} ${(now - t).toFixed(1)}`);
          t = now;
        };
        const checked = checkedState(c.args.state);
        step("state checked");
        const serve = restoreDevicesThen(plugged, bus, checked, tracingPhases ? step : undefined);
        restored = true;
        routeKicks();
        // The queues' first look once the reply is out: the caller's next step (a migration's
        // READY) need not wait for it, and nothing else runs on this thread before it.
        afterReply = () => {
          step("replied");
          serve();
          stopProfile("device-thread-restore");
          if (tracingPhases) writeSync(2, `typevisor: device thread restore (ms): ${steps.join(", ")}\n`);
        };
      }
      return { restored: true };
    case "disks.dirtyLog": {
      const b = c.args.buffers;
      if (b !== null && b.length !== disks.length) throw new TypevisorError("INVALID_REQUEST", `disks.dirtyLog: ${b.length} maps for ${disks.length} disks`);
      // Between requests (commands run between passes): no write is half-marked.
      disks.forEach(({ dev }, i) => (dev.dirtyBlocks = b === null ? undefined : new DirtyBlocks(b[i]!)));
      return { disks: disks.length };
    }
    case "disks.flush":
    case "disks.reopen": {
      const failed: string[] = [];
      for (const { name, dev } of disks) {
        const r = c.command === "disks.flush" ? dev.flushNow() : dev.reopen();
        if (r < 0) failed.push(`${name}: ${libc.errnoName(-r)}`);
      }
      if (failed.length > 0) throw new TypevisorError("DISK_IO", `${c.command === "disks.flush" ? "flushing" : "reopening"} the disks failed (${failed.join(", ")})`);
      return { disks: disks.length };
    }
    case "disks.retry":
      for (const { dev } of disks) dev.retryHeld();
      return { held: disks.reduce((n, { dev }) => n + dev.heldRequests, 0) };
    case "debug.stall": {
      if (init.debugCommands !== true) throw new TypevisorError("UNKNOWN_COMMAND", "debug commands are off");
      const start = clockMs();
      // Really blocked, as a thread stuck in a system call would be: no poll, no mailbox, no commands.
      Atomics.wait(stallWord, 0, 0, c.args.ms);
      return { stalledMs: clockMs() - start };
    }
    default: {
      const unknown: never = c;
      throw new TypevisorError("UNKNOWN_COMMAND", `no device command ${(unknown as { command: string }).command}`);
    }
  }
}

/** Work a command leaves for after its reply is posted (runCommand "restore"). */
let afterReply: (() => void) | undefined;

/** Serve commands the main thread posted (its messages queue up while this thread sleeps in poll). */
function serveCommands(): void {
  for (let m = receiveMessageOnPort(port!); m !== undefined; m = receiveMessageOnPort(port!)) {
    const c = m.message as DeviceCommand;
    row.i32[WORD.STATE] = deviceWord(PHASE.command);
    try {
      post({ type: "reply", id: c.id, ok: true, result: runCommand(c) });
    } catch (e) {
      post(isTypevisorError(e) ? { type: "reply", id: c.id, ok: false, code: e.code, message: e.message } : { type: "reply", id: c.id, ok: false, code: "DEVICE_COMMAND", message: (e as Error).message });
    }
    const after = afterReply;
    afterReply = undefined;
    try {
      after?.();
    } catch (e) {
      // A device's queue handling keeps its own errors (a broken queue asks for a reset); one
      // that escapes must not end this thread's loop with the VM already told it may run.
      writeSync(2, `typevisor: device thread: after the ${c.command} reply: ${(e as Error).message}\n`);
    }
  }
}

/** How long after this thread's loop starts the process's free malloc memory is given back once. */
const TRIM_AFTER_START_MS = 10_000;
// What each polled fd means: the mailbox/stop eventfd, a queue's ioeventfd, or a back end's own fd (e.g. TAP).
type Source = { kind: "mailbox" } | { kind: "kick"; p: Plugged; queue: number } | { kind: "backend"; p: Plugged; fd: number };
const fixedSources: Source[] = [{ kind: "mailbox" }];
const fixedFds = [init.eventfd];
for (const p of plugged) {
  for (const k of p.kicks) {
    fixedSources.push({ kind: "kick", p, queue: k.queue });
    fixedFds.push(k.fd);
  }
}
// The poll set is rebuilt only when the back-end fds a device wants change (a TAP is dropped
// while the guest has no receive buffers, and taken back after its next rx kick), not on
// every pass: per completed request this loop now costs one poll(2), one eventfd read and the
// back end's own work, with no arrays made. Rebuilding is cheap but the common pass (a queue
// kick with no change) is what a 1 MiB disk request or a TCP segment pays each time.
const sources: Source[] = [];
const fds: number[] = [];
const pollSet = new libc.PollSet();
/** The back-end fds in the current poll set, in order, to compare with what devices want now. */
const polledBackends: number[] = [];
function wantedBackendsChanged(): boolean {
  let n = 0;
  for (const p of plugged) {
    const dev = p.transport.device;
    const bfds = dev.backendFds;
    if (bfds === undefined) continue;
    for (const fd of bfds) {
      if (dev.backendWanted?.(fd) === false) continue;
      if (polledBackends[n++] !== fd) return true;
    }
  }
  return n !== polledBackends.length;
}
function rebuildPollSet(): void {
  sources.length = 0;
  fds.length = 0;
  polledBackends.length = 0;
  sources.push(...fixedSources);
  fds.push(...fixedFds);
  for (const p of plugged) {
    const dev = p.transport.device;
    for (const fd of dev.backendFds ?? []) {
      if (dev.backendWanted?.(fd) === false) continue;
      sources.push({ kind: "backend", p, fd });
      fds.push(fd);
      polledBackends.push(fd);
    }
  }
  pollSet.set(fds);
}
rebuildPollSet();
/** When the disks were last asked to check on their I/O threads (BlockDevice.tick). */
let lastTick = clockMs();
/**
 * When the process's malloc arenas are trimmed once (malloc_trim): what the VM's build and the
 * guest's first seconds allocated and freed (the boot payload's reads, module loading in every
 * thread) stays resident in glibc's free lists otherwise. Host, tiny guest: 0.7-1 MiB of ~36.
 */
let trimAt: number | undefined = lastTick + TRIM_AFTER_START_MS;
/** Passes through the loop (the board's SEQ: a reader sees this thread move). */
let passes = 0;
const POLL_WORD = deviceWord(PHASE.poll);
/**
 * poll's timeout: a second while something here has timed work (the trim, a disk's I/O thread to
 * watch or end), until the balloon's next statistics request when it polls them, none otherwise. An idle VM's devices then wait only on
 * their fds (a command and the stop write the mailbox eventfd), and the thread stops waking once
 * a second for nothing (docs/vmm.md).
 */
function pollTimeoutMs(): number {
  let ms = trimAt !== undefined ? 1000 : -1;
  for (const { dev } of disks) if (dev.needsTick) ms = 1000;
  // A balloon polling the guest's statistics: until its next request is due (none while it waits for the guest's answer).
  const b = balloon?.msUntilTick() ?? -1;
  if (b >= 0) ms = ms < 0 ? b : Math.min(ms, b);
  return ms;
}
while (Atomics.load(stop, 0) === 0) {
  // Back-end fds are polled only while their device wants them: a device without guest buffers wants none.
  if (wantedBackendsChanged()) rebuildPollSet();
  // poll is not stamped: its time counts from the last wake-up (serving took microseconds), so a
  // pass still reads the clock once, after poll, as it did before the board.
  row.i32[WORD.STATE] = POLL_WORD;
  const ready = pollSet.wait(pollTimeoutMs());
  const now = clockMs();
  // What this pass serves is stamped with its wake-up.
  row.f64[SLOT.SINCE] = now;
  row.i32[WORD.SEQ] = ++passes;
  balloon?.tick();
  if (now - lastTick >= 1000) {
    lastTick = now;
    row.i32[WORD.STATE] = deviceWord(PHASE.tick);
    for (const { dev } of disks) dev.tick();
    if (trimAt !== undefined && now >= trimAt) {
      trimAt = undefined;
      libc.mallocTrim();
    }
  }
  for (let r = 0; r < ready; r++) {
    const i = pollSet.readyIdx[r]!;
    const src = sources[i]!;
    if (src.kind === "mailbox") {
      row.i32[WORD.STATE] = deviceWord(PHASE.mailbox);
      libc.eventfdClear(fds[i]!);
      mailbox.serve({ handle });
      serveCommands();
    } else if (src.kind === "kick") {
      row.i32[WORD.STATE] = deviceWord(PHASE.notify, src.p.index, src.queue);
      libc.eventfdClear(fds[i]!);
      src.p.transport.queueNotify(src.queue);
    } else {
      row.i32[WORD.STATE] = deviceWord(PHASE.backend, src.p.index);
      src.p.transport.device.onBackendReadable?.(src.fd);
    }
  }
}
enterStamped(row, deviceWord(PHASE.stopping));
for (const p of plugged) {
  for (const k of p.kicks) {
    if (k.addr !== undefined) vm.ioeventfd(k.addr, 0, k.fd, true);
    libc.close(k.fd);
  }
  p.transport.device.reset();
}
// In-flight disk I/O finishes before guest memory goes away; the I/O threads stop.
for (const { dev } of disks) dev.close();
for (const fd of taps) libc.close(fd);
// Closes the listener and removes its socket file.
vsock?.close();
enterStamped(row, deviceWord(PHASE.finished));
