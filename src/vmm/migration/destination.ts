/**
 * The receiving side of a live migration: `typevisor run --incoming tcp:ADDR:PORT|unix:PATH`.
 * Listens for exactly one connection, builds the VM the stream describes (with this host's back
 * ends where given), fills its memory, puts the state in place and starts its devices, says
 * READY, and hands the VM to the caller to run only after the source's GO. Everything read is
 * checked (protocol.ts); any failure sends ERROR, destroys the half-built VM and throws: no VM.
 */
import { TypevisorError } from "../../errors.js";
import { ramRanges } from "../arch/x86_64/layout.js";
import { applyOverrides, incomingVm, type MachineConfig, type RestoreOverrides, type VmHost } from "../builder.js";
import { decodeState } from "../snapshot/state.js";
import type { Vm } from "../vm.js";
import { FRAME, FrameReader, frame, HelloSchema, MAX_STATE_STREAM, MIGRATION_VERSION, PAGE, send, streamError } from "./protocol.js";
import { acceptStream, type StreamSecurity } from "./transport.js";

export interface Incoming {
  vm: Vm;
  config: MachineConfig;
  /** Call once the VM runs: the source then ends. */
  running(): void;
}

export async function receiveMigration(spec: string, overrides: RestoreOverrides, host: VmHost, log: (line: string) => void, security: StreamSecurity = {}): Promise<Incoming> {
  const sock = await acceptStream(spec, security, log);
  sock.setNoDelay(true);
  const reader = new FrameReader(sock);
  let vm: Vm | undefined;
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
    vm = incomingVm(config, host);
    const mem = vm.memory;
    const stateParts: Buffer[] = [];
    let stateBytes = 0;
    for (;;) {
      const f = await reader.next();
      if (f.type === FRAME.PAGES) {
        if (f.payload.length < 8 + PAGE || (f.payload.length - 8) % PAGE !== 0) throw streamError(`PAGES of ${f.payload.length} bytes is not an address and whole pages`);
        const gpa = f.payload.readBigUInt64LE(0);
        const len = f.payload.length - 8;
        if (gpa % BigInt(PAGE) !== 0n || gpa > BigInt(Number.MAX_SAFE_INTEGER) || !inOneRegion(expected, Number(gpa), len)) throw streamError(`PAGES at 0x${gpa.toString(16)} (+${len}) lies outside guest RAM`);
        mem.write(Number(gpa), f.payload.subarray(8));
      } else if (f.type === FRAME.ZEROS) {
        if (f.payload.length !== 12) throw streamError(`ZEROS of ${f.payload.length} bytes`);
        const gpa = f.payload.readBigUInt64LE(0);
        const len = f.payload.readUInt32LE(8) * PAGE;
        if (gpa % BigInt(PAGE) !== 0n || gpa > BigInt(Number.MAX_SAFE_INTEGER) || len === 0 || !inOneRegion(expected, Number(gpa), len)) throw streamError(`ZEROS at 0x${gpa.toString(16)} (+${len}) lies outside guest RAM`);
        mem.fill(Number(gpa), len, 0);
      } else if (f.type === FRAME.STATE) {
        stateBytes += f.payload.length;
        if (stateBytes > MAX_STATE_STREAM) throw streamError(`the state is over ${MAX_STATE_STREAM} bytes`);
        stateParts.push(f.payload);
      } else if (f.type === FRAME.DONE) {
        break;
      } else if (f.type === FRAME.ERROR) {
        throw new TypevisorError("MIGRATION_PEER", `the source failed: ${f.payload.toString("utf8").slice(0, 2000)}`);
      } else throw streamError(`unexpected frame ${f.type} during the transfer`);
    }
    const state = decodeState(Buffer.concat(stateParts), "the migration stream's state");
    if (state.config.cpus !== config.cpus || state.config.memoryMiB !== config.memoryMiB) throw streamError("the state describes another machine than HELLO");
    vm.applyState(state, { what: "the migrated VM" });
    for (const w of vm.restoreWarnings) log(`typevisor: migration: ${w}`);
    // Back ends open and device state in place before READY: after GO nothing may fail here.
    await vm.prepareDevices();
    await send(sock, frame(FRAME.READY));
    await reader.expect(FRAME.GO);
    const built = vm;
    return {
      vm: built,
      config,
      running: () => {
        void send(sock, frame(FRAME.RUNNING)).finally(() => sock.end()).catch(() => undefined);
      },
    };
  } catch (e) {
    try {
      sock.write(Buffer.concat(frame(FRAME.ERROR, Buffer.from((e as Error).message.slice(0, 4000)))));
    } catch {
      // the connection is gone
    }
    sock.destroy();
    await vm?.discard();
    throw e;
  }
}

function inOneRegion(regions: readonly { start: number; size: number }[], gpa: number, len: number): boolean {
  return regions.some((r) => gpa >= r.start && gpa + len <= r.start + r.size);
}
