/**
 * A vCPU thread: blocks in KVM_RUN and serves the exits that come back.
 *
 * Port I/O for the legacy platform devices is handled right here, on the vCPU
 * thread, against device state shared through SharedArrayBuffers: a console
 * character costs one exit and one write(2), never a hop to the main thread.
 * The guest is hostile: any exit we do not understand is counted and answered
 * harmlessly (reads as all ones), never thrown at the user.
 */
import { parentPort } from "node:worker_threads";
import { EXIT, EXIT_NAMES, KVM, SYSTEM_EVENT } from "../../kvm/ioctls.js";
import { VcpuFd, VmFd } from "../../kvm/kvm.js";
import { KvmRun, type VmExit } from "../../kvm/run.js";
import * as libc from "../../sys/libc.js";
import { installFilter, vcpuFilter } from "../../sys/seccomp.js";
import { MAX_NICE } from "../defaults.js";
import { MMIO_HOLE_START, PCI_ECAM_SIZE, PCI_ECAM_START, PORT } from "../arch/x86_64/layout.js";
import { AcpiPm, ACPI_PM_BASE, ACPI_PM_LEN } from "../devices/legacy/acpi-pm/acpi-pm.js";
import { I8042 } from "../devices/legacy/i8042/i8042.js";
import { Serial } from "../devices/legacy/serial/serial.js";
import { MailboxClient, Op, type OpCode } from "../devices/platform/mailbox.js";
import { PioBus, type PioDevice } from "../devices/pio-bus.js";
import { boardRow, enterStamped, PHASE, SLOT, vcpuWord, WORD, withMailbox, withPhase } from "../threads/board.js";
import { CTRL, STAT_SLOTS, THROTTLE_SLICE_MS, VmRequest, type VcpuMessage, type VcpuWorkerInit, type VmRequestCode } from "./control.js";
import { formatRegisterDump } from "./dump.js";
import { workerInit } from "../threads/spawn.js";
import { tracingPhases } from "../phases.js";

const init = await workerInit<VcpuWorkerInit>();
const port = parentPort;
if (port === null) throw new Error("vCPU worker started outside a worker thread");

const ctrl = new Int32Array(init.control);
const stats = new Float64Array(init.stats, init.vcpuId * STAT_SLOTS * 8, STAT_SLOTS);
const vm = new VmFd(init.vmFd);
const vcpu = new VcpuFd(init.vcpuFd, init.vcpuId);

libc.installKickHandler();
const runMap = libc.mmap(init.runSize, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED, init.vcpuFd, 0);
const run = new KvmRun(libc.view(runMap.pointer, init.runSize));

/*
 * Where this vCPU is, for GET /threads (threads/board.ts). The hot path: before KVM_RUN one
 * store (`run`), after it one (`exit` with the reason) plus the address for io/mmio. No clock,
 * no allocation, no system call per exit.
 */
const row = boardRow(init.board, init.vcpuId);
const state = row.i32;
const where = row.f64;
/** The last state word stored: `run` keeps the details of the exit handled before it. */
let word = vcpuWord(PHASE.run);

function request(code: VmRequestCode): void {
  Atomics.compareExchange(ctrl, CTRL.REQUEST, VmRequest.NONE, code);
}

const bus = new PioBus();
bus.register(PORT.COM1, 8, new Serial(
  init.serial,
  () => {
    // ISA interrupts are edge-triggered on the IOAPIC: a pulse is one interrupt.
    vm.irqLine(init.com1Gsi, 1);
    vm.irqLine(init.com1Gsi, 0);
  },
  (bytes) => libc.writeAll(init.consoleFd, bytes),
));
bus.register(PORT.I8042_DATA, 5, new I8042(() => request(VmRequest.RESET)));
bus.register(ACPI_PM_BASE, ACPI_PM_LEN, new AcpiPm((r) => request(r === "poweroff" ? VmRequest.POWEROFF : VmRequest.RESET)));

// PCI lives on the device thread: configuration ports and the MMIO window are forwarded there.
const platform = init.platform !== undefined ? new MailboxClient(init.platform.mailbox, init.vcpuId, init.platform.eventfd) : undefined;
if (platform !== undefined) {
  const pciConfig: PioDevice = {
    read: (offset, size) => Number(callDevices(Op.PIO_READ, PORT.PCI_CONFIG_ADDRESS + offset, size, 0n)),
    write: (offset, size, value) => void callDevices(Op.PIO_WRITE, PORT.PCI_CONFIG_ADDRESS + offset, size, BigInt(value >>> 0)),
  };
  bus.register(PORT.PCI_CONFIG_ADDRESS, 8, pciConfig);
}
const PCI_MMIO_END = PCI_ECAM_START + PCI_ECAM_SIZE;

/** One access on the device thread, the board saying meanwhile that this exit waits for it. */
function callDevices(op: OpCode, addr: number, size: number, data: bigint): bigint {
  state[WORD.STATE] = withMailbox(word);
  const v = platform!.call(op, addr, size, data);
  state[WORD.STATE] = word;
  return v;
}

function handleMmio(addr: number, len: number, write: boolean): void {
  const data = run.mmioData();
  const size = Math.min(len, 8);
  if (platform === undefined || addr < MMIO_HOLE_START || addr + size > PCI_MMIO_END) {
    // Nothing decodes this address: reads see all ones, writes are dropped (an empty bus).
    if (!write) data.fill(0xff);
    return;
  }
  if (write) {
    let v = 0n;
    for (let i = size - 1; i >= 0; i--) v = (v << 8n) | BigInt(data[i]!);
    callDevices(Op.MMIO_WRITE, addr, size, v);
  } else {
    let v = callDevices(Op.MMIO_READ, addr, size, 0n);
    for (let i = 0; i < size; i++) {
      data[i] = Number(v & 0xffn);
      v >>= 8n;
    }
  }
}

function post(m: VcpuMessage): void {
  port!.postMessage(m);
}

function dump(): string {
  try {
    return formatRegisterDump(vcpu.getRegs(), vcpu.getSregs());
  } catch (e) {
    return `(registers unavailable: ${(e as Error).message})`;
  }
}

function handleIo(out: boolean, size: number, ioPort: number, count: number, dataOffset: number): void {
  const bytes = run.bytes;
  const dv = run.dv;
  // `count` > 1 for string instructions (rep outsb/insb): consecutive items in the data area.
  const n = Math.min(count, 4096);
  for (let i = 0; i < n; i++) {
    const off = dataOffset + i * size;
    if (off + size > bytes.length) return;
    if (out) {
      const v = size === 1 ? dv.getUint8(off) : size === 2 ? dv.getUint16(off, true) : dv.getUint32(off, true);
      bus.write(ioPort, size, v);
    } else {
      const v = bus.read(ioPort, size);
      if (size === 1) dv.setUint8(off, v);
      else if (size === 2) dv.setUint16(off, v, true);
      else dv.setUint32(off, v >>> 0, true);
    }
  }
}

/**
 * Finish the port or MMIO access the last exit left half-done before parking: KVM completes it
 * (writes a read's data into the guest register, moves RIP past the instruction) only on the
 * next KVM_RUN, and keeps that pending step in no state userspace can read, so a snapshot taken
 * before it would lose it (KVM API §5 "kvm_run", immediate_exit). With immediate_exit set,
 * KVM_RUN completes it and returns EINTR without running guest code.
 */
function completePending(): void {
  // Nothing can be pending before the first KVM_RUN; and a vCPU started parked before its state
  // is set (an incoming migration, Vm.prestart) must not be run at all until then.
  if (!entered) return;
  run.immediateExit = 1;
  libc.ioctlRaw(init.vcpuFd, KVM.RUN, 0);
  run.immediateExit = 0;
}

type LoopEnd = { request: VmRequestCode; reason: string; dump?: string };

/** Why an exit that the loop does not serve ends the run. */
function ending(exit: Exclude<VmExit, { kind: "io" | "mmio" | "hlt" | "intr" }>): LoopEnd {
  switch (exit.kind) {
    case "shutdown":
      return { request: VmRequest.CRASH, reason: "triple fault (KVM_EXIT_SHUTDOWN)", dump: dump() };
    case "system_event":
      if (exit.type === SYSTEM_EVENT.SHUTDOWN) return { request: VmRequest.POWEROFF, reason: "system event: shutdown" };
      if (exit.type === SYSTEM_EVENT.RESET) return { request: VmRequest.RESET, reason: "system event: reset" };
      return { request: VmRequest.CRASH, reason: `system event ${exit.type}`, dump: dump() };
    case "internal_error":
      return {
        request: VmRequest.CRASH,
        reason: `KVM internal error, suberror ${exit.suberror} [${exit.data.map((d) => "0x" + d.toString(16)).join(" ")}]`,
        dump: dump(),
      };
    case "fail_entry":
      return { request: VmRequest.CRASH, reason: `VM entry failed, reason 0x${exit.reason.toString(16)}`, dump: dump() };
    case "other":
      return { request: VmRequest.CRASH, reason: `unexpected exit ${EXIT_NAMES[exit.reason] ?? exit.reason}`, dump: dump() };
  }
}

/** Whether this vCPU has entered KVM_RUN yet. */
let entered = false;

/** When this vCPU last came back from a throttle sleep (or started running since one). */
let sliceStart = 0;

/**
 * Auto-converge: once this vCPU has had a slice in the guest, stay out for pct/(100-pct) of a
 * slice (20% throttle: 2.5 ms after each 10 ms). The wait ends early when the VMM changes the
 * throttle or notifies the word (pause, stop), so a paused or stopping VM never waits on it.
 */
function throttled(pct: number): void {
  const now = performance.now();
  if (now - sliceStart < THROTTLE_SLICE_MS) return;
  Atomics.wait(ctrl, CTRL.THROTTLE, pct, (THROTTLE_SLICE_MS * pct) / (100 - pct));
  sliceStart = performance.now();
}

function loop(): LoopEnd {
  for (;;) {
    const req = Atomics.load(ctrl, CTRL.REQUEST) as VmRequestCode;
    if (req !== VmRequest.NONE) return { request: req, reason: "requested" };
    if (Atomics.load(ctrl, CTRL.PAUSE) === 1) {
      completePending();
      enterStamped(row, withPhase(word, PHASE.paused));
      Atomics.add(ctrl, CTRL.PAUSED, 1);
      Atomics.notify(ctrl, CTRL.PAUSED);
      while (Atomics.load(ctrl, CTRL.PAUSE) === 1 && Atomics.load(ctrl, CTRL.REQUEST) === VmRequest.NONE) {
        Atomics.wait(ctrl, CTRL.PAUSE, 1, 1000);
      }
      Atomics.sub(ctrl, CTRL.PAUSED, 1);
      Atomics.notify(ctrl, CTRL.PAUSED);
      continue;
    }
    const throttle = Atomics.load(ctrl, CTRL.THROTTLE);
    if (throttle > 0) throttled(throttle);
    state[WORD.STATE] = withPhase(word, PHASE.run);
    if (!entered && tracingPhases) process.stderr.write(`typevisor: vCPU ${init.vcpuId} first KVM_RUN at ${(performance.timeOrigin + performance.now()).toFixed(1)} (epoch ms)\n`);
    entered = true;
    const r = libc.ioctlRaw(init.vcpuFd, KVM.RUN, 0);
    if (r < 0) {
      if (r === -libc.EINTR || r === -libc.EAGAIN) {
        // A kick: clear immediate_exit first, then re-read the control words above.
        word = vcpuWord(PHASE.exit, EXIT.INTR);
        state[WORD.STATE] = word;
        run.immediateExit = 0;
        stats[EXIT.INTR]!++;
        continue;
      }
      return { request: VmRequest.CRASH, reason: `KVM_RUN failed: ${libc.errnoName(-r)}`, dump: dump() };
    }
    const reason = run.exitReason;
    stats[reason < STAT_SLOTS - 1 ? reason : STAT_SLOTS - 1]!++;
    const exit = run.decode();
    switch (exit.kind) {
      case "io":
        where[SLOT.ADDR] = exit.port;
        word = vcpuWord(PHASE.exit, reason, exit.out, exit.size);
        state[WORD.STATE] = word;
        handleIo(exit.out, exit.size, exit.port, exit.count, exit.dataOffset);
        break;
      case "mmio":
        where[SLOT.ADDR] = exit.addr;
        word = vcpuWord(PHASE.exit, reason, exit.write, exit.len);
        state[WORD.STATE] = word;
        handleMmio(exit.addr, exit.len, exit.write);
        break;
      case "hlt":
      case "intr":
        word = vcpuWord(PHASE.exit, reason);
        state[WORD.STATE] = word;
        break;
      default:
        // An exit that ends the run: the board keeps it as the finished vCPU's last exit.
        word = vcpuWord(PHASE.exit, reason);
        return ending(exit);
    }
  }
}

/** Nicer than the VMM's other threads by init.niceOffset (defaults.ts DEFAULT_VCPU_NICE says why). */
function applyNice(): { nice: number; niceError?: string } {
  const tid = libc.gettid();
  let inherited = 0;
  try {
    inherited = libc.threadNice(tid);
    const nice = Math.min(MAX_NICE, inherited + init.niceOffset);
    if (nice !== inherited) libc.setThreadNice(tid, nice);
    return { nice };
  } catch (e) {
    // Only a seccomp filter or the like refuses this; the vCPU runs on at the weight it has.
    return { nice: inherited, niceError: (e as Error).message };
  }
}

Atomics.store(row.i32, WORD.TID, libc.gettid());
post({ type: "ready", vcpuId: init.vcpuId, thread: libc.pthreadSelf(), ...applyNice() });
// From here this thread only runs the guest: narrow it to what that takes (docs/security.md,
// "seccomp"). Without TSYNC the filter binds this thread alone; the process's filter still applies.
if (init.seccomp === true) installFilter(vcpuFilter(), { allThreads: false });
const result = loop();
// The last exit stays in the word (a crash's triple fault, a power-off's port write).
enterStamped(row, withPhase(word, PHASE.finished));
request(result.request);
post({ type: "exit", vcpuId: init.vcpuId, ...result });
libc.munmap(runMap);
