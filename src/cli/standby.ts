/**
 * `typevisor run --standby --api-socket S`: a VMM process started ahead of need. Node, the
 * VMM's modules and KVM access are ready; it waits on S for `PUT /restore {"snapshot": DIR,
 * ...}` and then becomes that VM exactly as `run --restore DIR` would, answering on the same
 * socket. A supervisor keeps a few of these so that creating a VM from a snapshot does not wait
 * for a process to start (docs/snapshots.md "Standby VMMs").
 */
import { z } from "zod";
import { TypevisorError } from "../errors.js";
import { startControlServer, SwitchableTarget, type ControlTarget } from "../vmm/api/server.js";
import { Kvm, kvmHostKind } from "../kvm/kvm.js";
import { prestartedCount, prestartWorkers, rehearseWorkers } from "../vmm/threads/spawn.js";
import { installFilter, noExecFilter } from "../sys/seccomp.js";
import { recvFds } from "../sys/scm-rights.js";
import { close } from "../sys/libc.js";
import { parseFdArg, runCommand, type RunOptions } from "./run.js";
import { prepareRestore, type PreparedRestore } from "../vmm/builder.js";
import { phase } from "../vmm/phases.js";

/** vCPU threads a standby starts ahead: templates are mostly small VMs (docs/snapshots.md "Standby VMMs"). */
const STANDBY_VCPU_THREADS = 1;

const pathString = z.string().min(1).max(4096).refine((s) => !s.includes("\0"), "no NUL bytes");

/** PUT /restore's body: the snapshot and this VM's own back ends and files. */
export const RestoreRequestSchema = z.strictObject({
  snapshot: pathString,
  id: z.string().max(63).optional(),
  consoleLog: pathString.optional(),
  consoleLogSize: z.string().max(16).optional(),
  consoleSocket: pathString.optional(),
  exitFile: pathString.optional(),
  statsFile: pathString.optional(),
  disks: z.array(z.string().max(4096)).max(64).optional(),
  nets: z.array(z.string().max(128)).max(64).optional(),
  /** A jailed standby (--handoff-fd): each of `nets`' TAPs comes as a descriptor on that socket, in order. */
  netFds: z.number().int().min(1).max(8).optional(),
  vsock: z.string().max(4096).optional(),
  /** What a guest reboot boots, in place of the snapshot's (run --restore --kernel/--initrd). */
  kernel: pathString.optional(),
  initrd: pathString.optional(),
  paused: z.boolean().optional(),
  keepClock: z.boolean().optional(),
});

const notYet = (): never => {
  throw new TypevisorError("VM_STATE", "this VMM is on standby: it has no VM until PUT /restore");
};

export async function standbyCommand(o: RunOptions, log: (line: string) => void): Promise<number> {
  if (o.apiSocket === undefined) throw new TypevisorError("INVALID_ARGUMENT", "--standby needs --api-socket (where PUT /restore arrives)");
  for (const [flag, given] of [["--image", o.image], ["--kernel", o.kernel], ["--restore", o.restore], ["--console-log", o.consoleLog], ["--console-socket", o.consoleSocket], ["--exit-file", o.exitFile], ["--stats-file", o.statsFile], ["--vsock", o.vsock]] as const) {
    if (given !== undefined) throw new TypevisorError("INVALID_ARGUMENT", `${flag} cannot be combined with --standby: PUT /restore says what the VM is`);
  }
  if (o.disk.length > 0 || o.net.length > 0) throw new TypevisorError("INVALID_ARGUMENT", "--disk/--net cannot be combined with --standby: PUT /restore names the back ends");
  // Checked now, so a host without usable KVM fails at standby, not at the restore.
  const kind = kvmHostKind();
  if (kind !== "hardware" && !(kind === "pvm" && o.forceKvm === true)) {
    throw new TypevisorError("KVM_UNSUITABLE", kind === "pvm" ? "this host's /dev/kvm is PVM: --standby runs only where a restored guest can (or with --force-kvm for purpose-built guests)" : "this host has no /dev/kvm");
  }
  new Kvm().close();
  // Jailed (the daemon's sandbox): the socket is bound by the daemon and inherited; no exec from
  // here on, before any request is read (the restore's run then need not install it again).
  const apiSocketFd = o.apiSocketFd !== undefined ? parseFdArg("--api-socket-fd", o.apiSocketFd, o.apiSocket) : undefined;
  const handoffFd = o.handoffFd !== undefined ? parseFdArg("--handoff-fd", o.handoffFd, "") : undefined;
  if (o.seccompNoExec === true) installFilter(noExecFilter());
  let chosen: ((r: { opts: RunOptions; built: () => void; failed: (e: unknown) => void }) => void) | undefined;
  const request = new Promise<{ opts: RunOptions; built: () => void; failed: (e: unknown) => void }>((resolve) => (chosen = resolve));
  const standby: ControlTarget = {
    info: () => ({ state: "standby", pid: process.pid }),
    stats: async () => notYet(),
    registers: notYet,
    devices: async () => notYet(),
    balloon: async () => notYet(),
    threads: async () => notYet(),
    pause: async () => notYet(),
    snapshot: async () => notYet(),
    resume: notYet,
    stop: () => {
      process.exitCode = 0;
      server.close();
      chosen = undefined;
      process.exit(0);
    },
    reboot: notYet,
    restore: (body: unknown) => {
      phase("request");
      const r = RestoreRequestSchema.safeParse(body);
      if (!r.success) {
        const first = r.error.issues[0];
        return Promise.reject(new TypevisorError("INVALID_REQUEST", `PUT /restore: ${first?.path.join(".") || "body"}: ${first?.message ?? "invalid"}`));
      }
      const take = chosen;
      if (take === undefined) return Promise.reject(new TypevisorError("VM_STATE", "a restore is already under way"));
      const b = r.data;
      let nets = b.nets ?? [];
      if (b.netFds !== undefined) {
        // The TAPs were opened by the daemon, in the host's network namespace, and sent just before this request.
        if (handoffFd === undefined) return Promise.reject(new TypevisorError("INVALID_REQUEST", "PUT /restore: netFds needs a standby started with --handoff-fd"));
        if (nets.length !== b.netFds || nets.some((n) => /(^|,)fd=/.test(n))) return Promise.reject(new TypevisorError("INVALID_REQUEST", "PUT /restore: netFds must count nets, which then name no fd"));
        let fds: number[];
        try {
          fds = recvFds(handoffFd, b.netFds);
        } catch (e) {
          return Promise.reject(e as Error);
        }
        nets = nets.map((n, i) => `${n},fd=${fds[i]!}`);
      }
      if (handoffFd !== undefined) close(handoffFd);
      chosen = undefined;
      const opts: RunOptions = {
        ...o, standby: false, seccompNoExec: false, restore: b.snapshot, disk: b.disks ?? [], net: nets,
        ...(b.id !== undefined ? { id: b.id } : {}),
        ...(b.consoleLog !== undefined ? { consoleLog: b.consoleLog } : {}),
        ...(b.consoleLogSize !== undefined ? { consoleLogSize: b.consoleLogSize } : {}),
        ...(b.consoleSocket !== undefined ? { consoleSocket: b.consoleSocket } : {}),
        ...(b.exitFile !== undefined ? { exitFile: b.exitFile } : {}),
        ...(b.statsFile !== undefined ? { statsFile: b.statsFile } : {}),
        ...(b.vsock !== undefined ? { vsock: b.vsock } : {}),
        ...(b.kernel !== undefined ? { kernel: b.kernel } : {}),
        ...(b.initrd !== undefined ? { initrd: b.initrd } : {}),
        paused: b.paused === true, keepClock: b.keepClock === true,
      };
      return new Promise((resolve, reject) => take({ opts, built: () => resolve({ ok: true, pid: process.pid }), failed: reject }));
    },
  };
  const target = new SwitchableTarget(standby);
  // Before the socket answers (which is when a supervisor counts this standby ready): what a
  // restore needs and a booting VMM leaves out (the state file's schemas: builder.ts), and the
  // VM's device thread (which starts a disk I/O thread of its own) and first vCPU thread, started
  // and waiting (vmm/threads/spawn.ts); a VM with more vCPUs or disks starts the others when it is built.
  // With a template, a VM for it built meanwhile (builder.ts prepareRestore). One that cannot be
  // read or built here leaves the standby as without one: a restore of it then fails as it would.
  const prepare = async (dir: string): Promise<PreparedRestore | undefined> => {
    try {
      return await prepareRestore(dir);
    } catch (e) {
      log(`typevisor: standby: template ${dir} not made ready (${e instanceof Error ? e.message : String(e)}); restores take the whole path`);
      return undefined;
    }
  };
  const [prepared] = await Promise.all([
    o.template !== undefined ? prepare(o.template) : import("../vmm/snapshot/state.js").then(() => undefined),
    prestartWorkers("devices/platform/device-thread.js", 1),
    prestartWorkers("vcpu/worker.js", STANDBY_VCPU_THREADS),
  ]);
  // The template's device state through the device thread's checker while nothing waits on it.
  if (prepared !== undefined && prepared.state.devices !== null) rehearseWorkers("devices/platform/device-thread.js", prepared.state.devices);
  const server = await startControlServer(o.apiSocket, target, apiSocketFd);
  log(`typevisor: on standby at ${o.apiSocket} (PUT /restore; ${prestartedCount("devices/platform/device-thread.js")} device thread and ${prestartedCount("vcpu/worker.js")} vCPU thread waiting${prepared !== undefined ? `; a VM built for ${prepared.dir}` : ""})`);
  const onSignal = (): void => process.exit(0);
  process.once("SIGTERM", onSignal);
  process.once("SIGINT", onSignal);
  const req = await request;
  process.off("SIGTERM", onSignal);
  process.off("SIGINT", onSignal);
  try {
    return await runCommand({ ...req.opts, attach: { target, onBuilt: req.built }, ...(prepared !== undefined ? { prepared } : {}) }, log);
  } catch (e) {
    req.failed(e);
    // Answered on the socket; the process ends as a failed restore would.
    await new Promise((r) => setTimeout(r, 50));
    throw e;
  } finally {
    server.close();
  }
}
