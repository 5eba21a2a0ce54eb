/**
 * The VMM's worker threads (the device thread, each vCPU thread, each disk's I/O thread), started
 * when a VM is built or, in a standby VMM, ahead of need. A worker's start-up is Node's bootstrap of a new isolate plus
 * loading the entry's modules: ~0.1 s each on a project machine and seconds in the lab's emulated
 * CPU, paid again by every VM built. A standby VMM (cli/standby.ts, issue 15's "instant create")
 * pays it before any VM is asked of it: its workers start with no VM to serve, load their
 * modules, say so, and wait; building a VM then hands each its init on a channel of its own
 * instead of as workerData. A `run` that boots or restores starts its device thread and a vCPU
 * thread the same way as it begins (cli/early-threads.ts), so their start overlaps its own.
 * Everything else about the thread is the same either way.
 */
import { MessageChannel, type MessagePort, Worker, workerData } from "node:worker_threads";
import { VMM_WORKER_LIMITS } from "../isolates.js";
import { type VmmWorkerEntry, workerUrl } from "../worker-url.js";

/**
 * workerData of a worker started ahead of need: its init comes later, as a message on `port`
 * (a channel of its own, so that nothing of this hand-over ever reaches the listeners the VM
 * puts on the worker itself, even for a worker taken before it finished starting). `warm`:
 * whether it runs its entry's warm-up while it waits (a standby's; a VMM that starts its
 * threads early only to overlap their start with its own has no use for it).
 */
interface Prestarted {
  prestarted: true;
  port: MessagePort;
  warm: boolean;
}
/**
 * What such a worker posts once its modules are loaded, and what it is sent: a sample of what its
 * init will carry to rehearse with while it waits (any number, optional), then its init when it is taken.
 */
type PrestartMessage = { type: "prestarted" } | { type: "rehearse"; sample: unknown } | { type: "init"; init: unknown };

const isPrestarted = (d: unknown): d is Prestarted => typeof d === "object" && d !== null && (d as Partial<Prestarted>).prestarted === true;

/** A worker started ahead of need, and the channel its init goes on. */
interface Spare {
  worker: Worker;
  port: MessagePort;
  gone: () => void;
  /** It said it is up (its modules loaded), or it ended. */
  started: boolean;
  /** endPrestarted came while it was still starting: it ends once it is up. */
  ending: boolean;
}

/**
 * End a spare that is up. One still starting is ended only once it is up: a worker terminated
 * while it loads a native addon (koffi's Node-API module initialisation) brings the whole
 * process down ("FATAL ERROR: Error::ThrowAsJavaScriptException napi_throw"), which a `run`
 * whose arguments failed its checks while its early threads started did.
 */
function endSpare(s: Spare): void {
  if (!s.started) {
    s.ending = true;
    return;
  }
  s.port.close();
  void s.worker.terminate();
}

/**
 * Workers this thread started ahead that wait for an init, per entry, in the order they were
 * started; one still loading its modules is among them (a build takes it as it is: its init
 * waits in its channel until it looks).
 */
const waiting = new Map<VmmWorkerEntry, Spare[]>();

/**
 * Start `count` workers of `entry` with no VM yet; resolves once each has loaded its modules
 * and waits, or failed (then it is left out). Until then the process stays up; a spare that
 * waits does not keep it alive. `warm` (default true): each runs its entry's warm-up while it
 * waits (workerInit).
 */
export async function prestartWorkers(entry: VmmWorkerEntry, count: number, opts: { warm?: boolean } = {}): Promise<void> {
  const started = Array.from({ length: count }, async () => {
    const { port1, port2 } = new MessageChannel();
    const data: Prestarted = { prestarted: true, port: port2, warm: opts.warm ?? true };
    const w = new Worker(workerUrl(entry), { workerData: data, transferList: [port2], resourceLimits: VMM_WORKER_LIMITS });
    w.unref();
    const gone = (): void => {
      const list = waiting.get(entry);
      const i = list?.findIndex((s) => s.worker === w) ?? -1;
      if (i >= 0) list!.splice(i, 1);
    };
    // An error event without a listener would end the process: a standby must outlive a failed spare.
    w.on("error", gone);
    w.once("exit", gone);
    const spare: Spare = { worker: w, port: port1, gone, started: false, ending: false };
    const list = waiting.get(entry) ?? [];
    list.push(spare);
    waiting.set(entry, list);
    // Its word that it is up (on the channel), or its end: whichever comes first. The channel
    // holds the process open meanwhile (a standby awaits this with nothing else open yet; a
    // spare ended while it starts must get this far), and no longer once the spare waits.
    await new Promise<void>((resolve) => {
      port1.once("message", () => resolve());
      port1.once("close", () => resolve());
      w.once("exit", () => resolve());
    });
    spare.started = true;
    if (spare.ending) endSpare(spare);
    else port1.unref();
  });
  await Promise.all(started);
}

/** Workers of `entry` started ahead and not taken (those still starting included). */
export function prestartedCount(entry: VmmWorkerEntry): number {
  return waiting.get(entry)?.length ?? 0;
}

/**
 * A worker of `entry` running with `init`: one started ahead of need when there is one (it gets
 * `init` on its channel, whether or not it has finished starting), else a new one with `init` as
 * its workerData.
 */
export function spawnWorker(entry: VmmWorkerEntry, init: unknown): Worker {
  const list = waiting.get(entry);
  for (let s = list?.shift(); s !== undefined; s = list?.shift()) {
    const w = s.worker;
    if (w.threadId === -1) continue;
    w.off("error", s.gone);
    w.off("exit", s.gone);
    w.ref();
    // Structured clone, as workerData is: SharedArrayBuffers are shared, fds and numbers copied.
    // The worker closes the channel once it has its init.
    s.port.postMessage({ type: "init", init } satisfies PrestartMessage);
    return w;
  }
  return new Worker(workerUrl(entry), { workerData: init, resourceLimits: VMM_WORKER_LIMITS });
}

/**
 * Hand each waiting worker of `entry` a sample of what a build will give it (a standby's template:
 * cli/standby.ts), to run through the code that will handle the real one (workerInit's `rehearse`),
 * so that code has run once, and is compiled, before the VM waits on it.
 */
export function rehearseWorkers(entry: VmmWorkerEntry, sample: unknown): void {
  for (const s of waiting.get(entry) ?? []) s.port.postMessage({ type: "rehearse", sample } satisfies PrestartMessage);
}

/**
 * End the spares no build took (a VM with fewer vCPUs or disks than a standby prepared for, or a
 * `run` that ends before its VM runs): a waiting isolate is a few MiB the VM would keep for
 * nothing. Called by the thread that started them once its part of the VM has started every
 * thread it needs. One still starting ends once it is up (endSpare); the process stays up until
 * then.
 */
export function endPrestarted(): void {
  for (const list of waiting.values()) for (const s of list.splice(0)) endSpare(s);
}

/**
 * In a worker's entry module: its init, from workerData, or, for a worker started ahead of need,
 * from its first message; meanwhile `warm` loads what a VM's init will need (for a standby: what a
 * restore needs), and `rehearse` runs each sample it is sent (rehearseWorkers) through that code.
 * A rehearsal that fails is ignored: it was for the code, and the init is checked on its own.
 * Top-level await: the rest of the entry module runs once the init is here.
 */
export async function workerInit<T>(warm?: () => Promise<unknown>, rehearse?: (sample: unknown) => Promise<void>): Promise<T> {
  if (!isPrestarted(workerData)) return workerData as T;
  const { port } = workerData;
  if (warm !== undefined && workerData.warm) await warm();
  // Every message on the channel, in order (an init may be there already: a build took this
  // worker while it was still starting).
  const queue: PrestartMessage[] = [];
  let wake: (() => void) | undefined;
  const onMessage = (m: PrestartMessage): void => {
    queue.push(m);
    wake?.();
  };
  port.on("message", onMessage);
  port.postMessage({ type: "prestarted" } satisfies PrestartMessage);
  for (;;) {
    while (queue.length === 0) await new Promise<void>((resolve) => (wake = resolve));
    wake = undefined;
    const m = queue.shift()!;
    if (m.type === "rehearse") {
      await rehearse?.(m.sample).catch(() => undefined);
      continue;
    }
    port.off("message", onMessage);
    port.close();
    if (m.type !== "init") throw new Error(`a prestarted worker got ${m.type} before its init`);
    return m.init as T;
  }
}
