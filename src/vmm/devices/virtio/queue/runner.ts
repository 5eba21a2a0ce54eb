import type { ActivateContext, QueueInspect } from "../device.js";
import { hasFeature, VIRTIO_F } from "../device.js";
import type { DescriptorChain, SplitQueueState } from "./split-queue.js";
import { QueueError, SplitQueue } from "./split-queue.js";

/*
 * The loop every device runs on a notification, so devices only write the request handler.
 * Policy on driver errors (as QEMU's virtio_error): a broken ring or a malformed request
 * makes the queue stop and the device ask for a reset (virtio 1.2 §2.1.2 DEVICE_NEEDS_RESET);
 * well-formed requests that fail (I/O error, bad sector) are answered in-band by the device.
 */

/**
 * What a handler returns: bytes written into the chain's writable part, a driver error, or
 * DEFERRED: the handler keeps the chain and pushes it to the used ring itself when its I/O is
 * done (then raises the interrupt if needsInterrupt says so).
 */
export type ChainResult = number | QueueError;
export const DEFERRED = -1;

/**
 * Build the device's queues from the transport's configs (and saved cursors when restoring).
 * A queue the driver placed badly is reported through needsReset and left out (undefined).
 */
export function activateQueues(ctx: ActivateContext, maxSizes: readonly number[], saved?: readonly (SplitQueueState | null)[]): (SplitQueue | undefined)[] {
  const opts = { eventIdx: hasFeature(ctx.features, VIRTIO_F.EVENT_IDX), indirect: hasFeature(ctx.features, VIRTIO_F.INDIRECT_DESC) };
  return maxSizes.map((max, i) => {
    const cfg = ctx.queues[i];
    if (cfg === undefined || cfg.size === 0) return undefined;
    if (cfg.size > max) {
      ctx.needsReset(`queue ${i} size ${cfg.size} exceeds the device maximum ${max}`);
      return undefined;
    }
    try {
      const st = saved?.[i];
      return st != null ? SplitQueue.restore(ctx.mem, { ...st, config: cfg }, opts) : new SplitQueue(ctx.mem, cfg, opts);
    } catch (e) {
      ctx.needsReset(`queue ${i}: ${e instanceof Error ? e.message : String(e)}`);
      return undefined;
    }
  });
}

/**
 * Pop and handle every available chain of queue `q`, push the results and raise the interrupt
 * if the driver wants one. Never throws: anything unexpected becomes a needsReset.
 * `canTake`: false stops popping (a device with all its I/O slots busy), leaving the rest in
 * the ring, without asking for a notification: the device calls again when a slot frees.
 */
export function serviceQueue(ctx: ActivateContext, q: number, queue: SplitQueue | undefined, handle: (chain: DescriptorChain) => ChainResult, canTake?: () => boolean): void {
  if (queue === undefined || queue.broken !== undefined) return;
  try {
    do {
      for (;;) {
        if (canTake !== undefined && !canTake()) return;
        const chain = queue.pop();
        if (chain === undefined) break;
        if (chain instanceof QueueError) {
          ctx.needsReset(`queue ${q}: ${chain.message}`);
          return;
        }
        const r = handle(chain);
        if (r instanceof QueueError) {
          queue.poison(r);
          ctx.needsReset(`queue ${q}: ${r.message}`);
          return;
        }
        if (r !== DEFERRED) queue.pushUsed(chain.head, Math.min(r, chain.totalWrite));
      }
    } while (queue.armNotification());
  } catch (e) {
    // Chains are validated, so this is a bug or memory that changed under us; fail the queue, not the VMM.
    const err = queue.poison(new QueueError("VIRTQ_INTERNAL", e instanceof Error ? e.message : String(e)));
    ctx.needsReset(`queue ${q}: ${err.message}`);
  } finally {
    try {
      if (queue.needsInterrupt()) ctx.interruptQueue(q);
    } catch {
      // needsInterrupt reads validated ring addresses; nothing sensible to do if that fails.
    }
  }
}

/** Each of `count` queues' QueueInspect, null where the device has not built that queue (GET /threads). */
export function inspectQueues(queues: readonly (SplitQueue | undefined)[], count: number): (QueueInspect | null)[] {
  const out: (QueueInspect | null)[] = [];
  for (let i = 0; i < count; i++) out.push(queues[i]?.inspect() ?? null);
  return out;
}
