/**
 * The receiving side of a live migration: `typevisor run --incoming tcp:ADDR:PORT|unix:PATH`.
 * Listens for exactly one connection, builds the VM the stream describes (with this host's back
 * ends where given), fills its memory, puts the state in place and starts its devices, says
 * READY, and hands the VM to the caller to run only after the source's GO. Everything read is
 * checked (protocol.ts); any failure sends ERROR, destroys the half-built VM and throws: no VM.
 */
import { closeSync, fdatasync as fdatasyncAsync } from "node:fs";
import type { Socket } from "node:net";
import { TypevisorError } from "../../errors.js";
import { ramRanges } from "../arch/x86_64/layout.js";
import { applyOverrides, incomingVm, type MachineConfig, type RestoreOverrides, type VmHost } from "../builder.js";
import { decodeState, encodeState } from "../snapshot/state.js";
import type { Vm } from "../vm.js";
import { prestartWorkers } from "../threads/spawn.js";
import { keepCompiledCode } from "../code-flush.js";
import { phase } from "../phases.js";
import { startProfile, stopProfile } from "../profile.js";
import { niceHelperThreads } from "../threads/kernel.js";
import { MAX_NICE } from "../defaults.js";
import { DISK_HEADER, FRAME, type DirectFrames, frame, jsonFrame, MAX_STATE_FRAMES, MAX_STATE_STREAM, MIGRATION_VERSION, PAGE, pageSetTarget, readPageSet, send, SET_HEAD, streamError, streamedMemory } from "./protocol.js";
import type { DestinationTimes } from "./source.js";
import { HelloSchema } from "./hello-schema.js";
import { listenStream, type StreamListener, type StreamSecurity } from "./transport.js";
import { frameReaderFor } from "./read-into.js";
import { createDiskTargets, finishDiskTargets, removeDiskTargets, writeDiskData, type DiskTarget } from "./disk-targets.js";

export interface ReceiveOptions {
  /**
   * Aborted when the VMM is told to stop (SIGTERM, SIGINT): while it waits for the stream, it
   * stops listening; while the stream comes in (before READY), the stream is cut. Either way
   * receiveMigration fails with MIGRATION_STOPPED and leaves nothing behind.
   */
  signal?: AbortSignal;
}

export interface Incoming {
  vm: Vm;
  config: MachineConfig;
  /** Call once the VM runs: the source then ends. */
  running(): void;
}

/**
 * Worker threads started before the stream is accepted (threads/spawn.ts): Node's bootstrap of
 * each isolate and its modules took seconds of the lab's one CPU, and at HELLO they competed with
 * the memory stream for it (bench/migrate, idle 256 MiB: the destination's device and vCPU
 * threads used 3.7 and 1.6 s of CPU during the migration). A VM with more vCPUs starts the others at
 * HELLO, still before the pause.
 */
const PRESTARTED_VCPU_THREADS = 1;

/** How long after the guest resumes here V8's helper threads stay at nice 19 (niceHelperThreads). */
const HELPERS_BACK_MS = 2000;

export async function receiveMigration(spec: string, overrides: RestoreOverrides, host: VmHost, log: (line: string) => void, security: StreamSecurity = {}, opts: ReceiveOptions = {}): Promise<Incoming> {
  const { signal } = opts;
  // A function, not a narrowed property: the signal is aborted across awaits.
  const aborted = (): boolean => signal?.aborted === true;
  const stopped = (): TypevisorError => new TypevisorError("MIGRATION_STOPPED", "stopped before a migration came in");
  if (aborted()) throw stopped();
  // The warm-ups below (threads, state checks, applyState's rehearsal) must outlive the stream's collections.
  const releaseCode = keepCompiledCode();
  // Before listening: whoever waits for "waiting for a migration" starts the source on a ready side.
  let accepted: Socket;
  let listener: StreamListener | undefined;
  const stopListening = (): void => listener?.close();
  signal?.addEventListener("abort", stopListening, { once: true });
  try {
    await Promise.all([prestartWorkers("devices/platform/device-thread.js", 1), prestartWorkers("vcpu/worker.js", PRESTARTED_VCPU_THREADS)]);
    if (aborted()) throw stopped();
    listener = listenStream(spec, security, log);
    accepted = await listener.accepted;
  } catch (e) {
    releaseCode();
    throw aborted() ? stopped() : e;
  } finally {
    signal?.removeEventListener("abort", stopListening);
  }
  // A plain socket's reads go straight where the frames go (read-into.ts); TLS keeps FrameReader.
  const { sock, reader } = frameReaderFor(accepted);
  sock.setNoDelay(true);
  // Stopped while the stream comes in (before READY): the stream is cut, and the source, which
  // has not committed, keeps its VM running. From READY on the source may commit at any moment,
  // so the VM is taken (and a stop asked meanwhile ends it once it is built: cli/run.ts).
  const cut = (): void => void sock.destroy();
  signal?.addEventListener("abort", cut, { once: true });
  let vm: Vm | undefined;
  let prestartError: Error | undefined;
  /** "disks": "copy": the files this side writes the disks' contents into. */
  let targets: DiskTarget[] = [];
  /** Puts V8's helper threads back to their nice value, once they were set aside (from the first SYNC). */
  let undoHelpers: (() => void) | undefined;
  try {
    let raw: unknown;
    try {
      raw = JSON.parse((await reader.expect(FRAME.HELLO)).toString("utf8"));
    } catch (e) {
      if (e instanceof SyntaxError) throw streamError("HELLO is not JSON");
      throw e;
    }
    const h = HelloSchema.safeParse(raw);
    if (!h.success) throw streamError(`HELLO: ${h.error.issues[0]?.path.join(".") ?? ""}: ${h.error.issues[0]?.message ?? "invalid"}`);
    if (h.data.version !== MIGRATION_VERSION) throw streamError(`protocol version ${h.data.version}, this typevisor speaks ${MIGRATION_VERSION}`);
    const config = applyOverrides(h.data.config, overrides);
    const expected = ramRanges(config.memoryMiB * 1024 * 1024);
    if (h.data.regions.length !== expected.length || h.data.regions.some((r, i) => r.guestPhysAddr !== expected[i]!.start || r.size !== expected[i]!.size)) {
      throw streamError(`HELLO: RAM regions do not match a ${config.memoryMiB} MiB VM`);
    }
    // Before the VM: its device thread opens the disks (with the size they will have) when HELLO is in.
    if (h.data.disks !== undefined) targets = createDiskTargets(config.devices.disks, h.data.disks);
    vm = incomingVm(config, host);
    // The device thread and the vCPU threads start now, while the memory streams in, rather than
    // inside the guest's pause (the lab measured seconds for their start-up there).
    // PREPARED tells the source it may pause the guest now; a failure ends the stream at once.
    const built = vm;
    const prestarted = vm.prestart().then(
      async () => {
        await warmStateChecks(built, h.data.config);
        await send(sock, frame(FRAME.PREPARED));
      },
      (e: unknown) => {
        prestartError = e as Error;
        sock.destroy();
        throw e;
      },
    );
    prestarted.catch(() => undefined);
    const mem = vm.memory;
    const stateParts: Buffer[] = [];
    let doneAt = 0;
    const at = (): number => Math.round((performance.now() - doneAt) * 10) / 10;
    let stateBytes = 0;
    // PAGES: the address is checked, then the pages go into guest memory (read there by the kernel
    // on a plain socket: read-into.ts).
    const inRam = (gpa: number, len: number): boolean => inOneRegion(expected, gpa, len);
    const pages: DirectFrames = {
      heads: new Map([
        [FRAME.PAGES, 8],
        [FRAME.PAGE_SET, SET_HEAD],
      ]),
      begin: (type, head, len) => {
        if (type === FRAME.PAGE_SET) {
          const set = readPageSet(head, len, inRam);
          for (const gpa of set.zero) mem.fill(gpa, PAGE, 0);
          return pageSetTarget(set.data, (gpa, max) => mem.writableRun(gpa, max));
        }
        if (len < PAGE || len % PAGE !== 0) throw streamError(`PAGES of ${len + 8} bytes is not an address and whole pages`);
        const gpa = head.readBigUInt64LE(0);
        if (gpa % BigInt(PAGE) !== 0n || gpa > BigInt(Number.MAX_SAFE_INTEGER) || !inRam(Number(gpa), len)) throw streamError(`PAGES at 0x${gpa.toString(16)} (+${len}) lies outside guest RAM`);
        const base = Number(gpa);
        return (at, max) => mem.writableRun(base + at, max);
      },
    };
    for (;;) {
      const f = await reader.next(pages);
      if (f.type === FRAME.PAGES) {
        // In guest memory already (the head was shorter than a page: refused).
        if (f.payload.length !== 8) throw streamError(`PAGES of ${f.payload.length} bytes is not an address and whole pages`);
      } else if (f.type === FRAME.PAGE_SET) {
        // Its zero pages are zeroed and its data in guest memory already (a frame shorter than its head: refused).
        if (f.payload.length !== SET_HEAD) throw streamError(`PAGE_SET of ${f.payload.length} bytes is shorter than its head`);
      } else if (f.type === FRAME.DISK_DATA) {
        if (f.payload.length <= DISK_HEADER) throw streamError(`DISK_DATA of ${f.payload.length} bytes carries no data`);
        const disk = f.payload.readUInt32LE(0);
        const offset = f.payload.readBigUInt64LE(8);
        const len = f.payload.length - DISK_HEADER;
        const t = targets[disk];
        if (t === undefined) throw streamError(`DISK_DATA for disk ${disk}; HELLO copies ${targets.length} disks`);
        if (f.payload.readUInt32LE(4) !== 0 || offset > BigInt(t.size) || Number(offset) + len > t.size) throw streamError(`DISK_DATA at ${offset} (+${len}) lies outside disk ${disk} (${t.size} bytes)`);
        writeDiskData(t, Number(offset), f.payload.subarray(DISK_HEADER));
      } else if (f.type === FRAME.SYNC) {
        // Every frame before it is in guest memory (or on the disks): say so (protocol.ts).
        if (f.payload.length !== 4) throw streamError(`SYNC of ${f.payload.length} bytes`);
        startProfile();
        // Past round 0 what is left is short and ends in the guest's pause: V8's background
        // compiles and collections wait until the guest runs here (threads/kernel.ts).
        undoHelpers ??= niceHelperThreads(MAX_NICE);
        await send(sock, frame(FRAME.SYNCED, f.payload));
      } else if (f.type === FRAME.STATE) {
        stateBytes += f.payload.length;
        if (stateBytes > MAX_STATE_STREAM) throw streamError(`the state is over ${MAX_STATE_STREAM} bytes`);
        if (stateParts.length >= MAX_STATE_FRAMES) throw streamError(`the state comes in over ${MAX_STATE_FRAMES} STATE frames`);
        stateParts.push(f.payload);
      } else if (f.type === FRAME.DONE) {
        doneAt = performance.now();
        phase("done");
        break;
      } else if (f.type === FRAME.ERROR) {
        throw new TypevisorError("MIGRATION_PEER", `the source failed: ${f.payload.toString("utf8").slice(0, 2000)}`);
      } else throw streamError(`unexpected frame ${f.type} during the transfer`);
    }
    const stateBytesIn = Buffer.concat(stateParts);
    phase("concat");
    const state = decodeState(stateBytesIn, "the migration stream's state");
    if (state.config.cpus !== config.cpus || state.config.memoryMiB !== config.memoryMiB) throw streamError("the state describes another machine than HELLO");
    const times: Partial<DestinationTimes> = { stateDecoded: at() };
    // The threads must be up (parked) before the vCPU state goes in: they never ran, nothing is pending.
    await prestarted;
    times.threadsReady = at();
    vm.applyState(state, { what: "the migrated VM" });
    times.stateApplied = at();
    // The devices opened the disks at HELLO: shared ones while the source still wrote them (it
    // wrote its cached metadata back before DONE: source.ts), copied qcow2 ones still empty (their
    // metadata is written back now). A qcow2 image's tables are read again (QEMU's invalidate).
    finishDiskTargets(targets);
    if (config.devices.disks.length > 0) await vm.deviceCommand({ command: "disks.reopen" });
    phase("reopened");
    for (const w of vm.restoreWarnings) log(`typevisor: migration: ${w}`);
    // Back ends open and device state in place before READY: after GO nothing may fail here.
    await vm.restoreDevices();
    phase("devicesRestored");
    times.devicesRestored = at();
    signal?.removeEventListener("abort", cut);
    if (aborted()) throw stopped();
    await send(sock, frame(FRAME.READY));
    times.readySent = at();
    await reader.expect(FRAME.GO);
    times.goReceived = at();
    const copied = targets;
    targets = [];
    return {
      vm: built,
      config,
      running: () => {
        times.resumed = at();
        stopProfile("migration-destination");
        releaseCode();
        // The guest's first moments here are its own (its vCPU catches up); the helpers after them.
        if (undoHelpers !== undefined) setTimeout(undoHelpers, HELPERS_BACK_MS).unref();
        void send(sock, jsonFrame(FRAME.RUNNING, times)).finally(() => sock.end()).catch(() => undefined);
        // The copied disks' bytes are in the page cache (what the guest reads); to stable storage
        // now, off the pause and off this thread (the guest's own flushes order its writes anyway).
        for (const t of copied) {
          fdatasyncAsync(t.fd, (err) => {
            if (err !== null) log(`typevisor: migration: syncing the copied disk ${t.path}: ${err.code ?? err.message}`);
            closeSync(t.fd);
          });
        }
      },
    };
  } catch (caught) {
    signal?.removeEventListener("abort", cut);
    // The threads' start-up failing cut the stream: that failure is the one to tell; a stop cut
    // it otherwise.
    const e = prestartError ?? (aborted() ? stopped() : caught);
    try {
      sock.write(Buffer.concat(frame(FRAME.ERROR, Buffer.from((e as Error).message.slice(0, 4000)))));
    } catch {
      // the connection is gone
    }
    sock.destroy();
    undoHelpers?.();
    await vm?.discard();
    // Nothing left behind: a file made here goes, an empty one given goes back to empty.
    removeDiskTargets(targets);
    releaseCode();
    throw e;
  }
}

function inOneRegion(regions: readonly { start: number; size: number }[], gpa: number, len: number): boolean {
  return regions.some((r) => gpa >= r.start && gpa + len <= r.start + r.size);
}

/**
 * The state's checker (decodeState: schema set-up on first use) is slow the first time: ~300 ms
 * on a loaded host, far more in the lab, and ~1 ms afterwards; so is the first applyState. Run
 * both once on this VM's own (never-run) state while the memory streams in (Vm.rehearseApply puts
 * back what it read), so the real state is checked and applied faster in the pause. Only a
 * warm-up: whatever it finds is ignored.
 */
async function warmStateChecks(vm: Vm, config: MachineConfig): Promise<void> {
  try {
    const sample = await vm.captureState(config, "paused");
    // With its memory described as the stream's will be, so the check of that part and the
    // state's cross-checks (which only a state with memory gets) run too.
    vm.rehearseApply(decodeState(encodeState({ ...sample, memory: streamedMemory(vm.memory.hostRegions) }), "a warm-up sample"));
  } catch {
    // only a warm-up: the migration does not need it
  }
}
