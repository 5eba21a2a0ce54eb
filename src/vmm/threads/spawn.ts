/**
 * The VMM's worker threads (the device thread, each vCPU thread, each disk's I/O thread), started
 * when a VM is built or, in a standby VMM, ahead of need. A worker's start-up is Node's bootstrap of a new isolate plus
 * loading the entry's modules: ~0.1 s each on a project machine and seconds in the lab's emulated
 * CPU, paid again by every VM built. A standby VMM (cli/standby.ts, issue 15's "instant create")
 * pays it before any VM is asked of it: its workers start with no VM to serve, load their
 * modules, say so, and wait; building a VM then hands each its init as its first message
 * instead of as workerData. Everything else about the thread is the same either way.
 */
import { once } from "node:events";
import { parentPort, Worker, workerData } from "node:worker_threads";
import { VMM_WORKER_LIMITS } from "../isolates.js";
import { workerUrl } from "../worker-url.js";

/**
 * Entry modules of the workers a VM's build starts (relative to src/vmm/, as workerUrl takes
 * them): the main thread starts the device thread and the vCPU threads, the device thread each
 * disk's I/O thread. A pool of spares is per thread (module state), like the workers it starts.
 */
export type VmmWorkerEntry = "devices/platform/device-thread.js" | "vcpu/worker.js" | "devices/virtio/block/io-worker.js";

/** workerData of a worker started ahead of need: its init comes later, as its first message. */
interface Prestarted {
  prestarted: true;
}
/**
 * What such a worker posts once its modules are loaded, and what it is sent: a sample of what its
 * init will carry to rehearse with while it waits (any number, optional), then its init when it is taken.
 */
type PrestartMessage = { type: "prestarted" } | { type: "rehearse"; sample: unknown } | { type: "init"; init: unknown };

const isPrestarted = (d: unknown): d is Prestarted => typeof d === "object" && d !== null && (d as Partial<Prestarted>).prestarted === true;

/** Workers this thread started ahead that wait for an init, per entry. */
const waiting = new Map<VmmWorkerEntry, Worker[]>();

/**
 * Start `count` workers of `entry` with no VM yet; resolves once each has loaded its modules
 * and waits (a worker that fails on the way is left out). They do not keep the process alive.
 */
export async function prestartWorkers(entry: VmmWorkerEntry, count: number): Promise<void> {
  const started = Array.from({ length: count }, async () => {
    const w = new Worker(workerUrl(entry), { workerData: { prestarted: true } satisfies Prestarted, resourceLimits: VMM_WORKER_LIMITS });
    w.unref();
    const gone = (): void => {
      const list = waiting.get(entry);
      const i = list?.indexOf(w) ?? -1;
      if (i >= 0) list!.splice(i, 1);
    };
    // An error event without a listener would end the process: a standby must outlive a failed spare.
    w.on("error", gone);
    w.once("exit", gone);
    try {
      const [m] = (await once(w, "message")) as [PrestartMessage];
      if (m.type !== "prestarted") return;
    } catch {
      return; // it failed while loading: builds start their own
    }
    if (w.threadId === -1) return;
    const list = waiting.get(entry) ?? [];
    list.push(w);
    waiting.set(entry, list);
  });
  await Promise.all(started);
}

/** Workers of `entry` started ahead and still waiting. */
export function prestartedCount(entry: VmmWorkerEntry): number {
  return waiting.get(entry)?.length ?? 0;
}

/**
 * A worker of `entry` running with `init`: one started ahead of need when there is one (it gets
 * `init` as its first message), else a new one with `init` as its workerData.
 */
export function spawnWorker(entry: VmmWorkerEntry, init: unknown): Worker {
  const list = waiting.get(entry);
  for (let w = list?.shift(); w !== undefined; w = list?.shift()) {
    if (w.threadId === -1) continue;
    w.removeAllListeners("error");
    w.removeAllListeners("exit");
    w.ref();
    // Structured clone, as workerData is: SharedArrayBuffers are shared, fds and numbers copied.
    w.postMessage({ type: "init", init } satisfies PrestartMessage);
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
  for (const w of waiting.get(entry) ?? []) w.postMessage({ type: "rehearse", sample } satisfies PrestartMessage);
}

/**
 * End the spares no build took (a VM with fewer vCPUs or disks than a standby prepared for): a
 * waiting isolate is a few MiB the VM would keep for nothing. Called by the thread that started
 * them once its part of the VM has started every thread it needs.
 */
export function endPrestarted(): void {
  for (const list of waiting.values()) for (const w of list.splice(0)) void w.terminate();
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
  const port = parentPort;
  if (port === null) throw new Error("workerInit outside a worker thread");
  if (warm !== undefined) await warm();
  // Every message, in order, from before saying so: the parent sends only once "prestarted" arrived.
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
    if (m.type !== "init") throw new Error(`a prestarted worker got ${m.type} before its init`);
    return m.init as T;
  }
}
