/**
 * A `typevisor run` that will build its VM in this process starts the VM's worker threads (the
 * device thread, and one vCPU thread) before anything else: before the `run` command's modules
 * load, before the kernel is read and the VM is built. Each worker is a new V8 isolate that
 * bootstraps Node and loads its own modules (~0.2 s on a project machine, seconds under the lab's
 * emulator: docs/benchmarks.md); started here, that overlaps the main thread's own start, and
 * the build hands each its init once it has one (threads/spawn.ts; a worker still starting then
 * takes it when it looks). Nothing else about the threads changes: the same entries, the same
 * limits, the same inits.
 *
 * Decided from the raw arguments, so nothing here costs a module load it would save: only a
 * `run` that boots (with devices: otherwise no device thread is wanted) or restores. A standby
 * and an incoming migration start theirs ahead already (with their warm-ups), `--sandbox` runs
 * its VMM in another process, and help runs none. A `run` that ends up running no VM here (an
 * error, or a re-run inside the lab) ends them (cli/run.ts).
 */
import { endPrestarted, prestartWorkers } from "../vmm/threads/spawn.js";

/** Flags after which this process builds no VM itself, or starts its threads its own way. */
const NOT_HERE = ["--help", "-h", "--standby", "--incoming", "--sandbox"];
/** Flags that give the VM a device, so a device thread. */
const DEVICE_FLAGS = ["--disk", "--net", "--rng", "--vsock", "--balloon"];
/**
 * At most this many vCPU threads start early: the count is not checked yet (against the host's
 * KVM limit), and a bigger VM's build starts the rest itself.
 */
const MAX_EARLY_VCPU_THREADS = 8;

/** The value of `--name V` or `--name=V` in `args`, if given. */
function flagValue(args: readonly string[], name: string): string | undefined {
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === name) return args[i + 1];
    if (a.startsWith(`${name}=`)) return a.slice(name.length + 1);
  }
  return undefined;
}

const given = (args: readonly string[], name: string): boolean => args.some((a) => a === name || a.startsWith(`${name}=`));

/** What `argv` (process.argv's shape) has this process start early, if it is such a `run`. */
export function earlyThreads(argv: readonly string[]): { deviceThread: boolean; vcpuThreads: number } | undefined {
  const args = argv.slice(2);
  if (args[0] !== "run" || NOT_HERE.some((f) => given(args, f))) return undefined;
  const restoring = given(args, "--restore");
  const deviceThread = restoring || DEVICE_FLAGS.some((f) => given(args, f));
  // A restore's count is the snapshot's: one, as most VMs have (the rest start when it is known).
  const cpus = restoring ? 1 : Number(flagValue(args, "--cpus") ?? "1");
  const vcpuThreads = Number.isInteger(cpus) && cpus >= 1 ? Math.min(cpus, MAX_EARLY_VCPU_THREADS) : 1;
  return { deviceThread, vcpuThreads };
}

/** Start them (not awaited: the build takes them as they are). */
export function startEarlyThreads(argv: readonly string[]): void {
  const e = earlyThreads(argv);
  if (e === undefined) return;
  // Without their warm-ups: a booting VM has no state to check and wants no disk thread ahead.
  if (e.deviceThread) void prestartWorkers("devices/platform/device-thread.js", 1, { warm: false });
  void prestartWorkers("vcpu/worker.js", e.vcpuThreads, { warm: false });
}

/** End those no VM took (the command is over: it ran its VM, or failed before). */
export function endEarlyThreads(): void {
  endPrestarted();
}
