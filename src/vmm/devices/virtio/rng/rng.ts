import { randomFillSync } from "node:crypto";
import { TypevisorError } from "../../../../errors.js";
import type { ActivateContext, VirtioDevice, VirtioDeviceInspect } from "../device.js";
import { featureBit, VIRTIO_F, VIRTIO_ID } from "../device.js";
import { chainSlices } from "../queue/chain.js";
import { activateQueues, inspectQueues, serviceQueue } from "../queue/runner.js";
import type { SplitQueue, SplitQueueState } from "../queue/split-queue.js";

export interface RngDeviceOptions {
  /** Queue size the device allows (power of 2). Default 256. */
  queueSize?: number;
  /**
   * Most random bytes per request. A guest can post one 4 GiB buffer; filling it in one go
   * would stall the main thread, and the driver accepts fewer bytes than it asked for (used len).
   * Default 64 KiB.
   */
  maxBytesPerRequest?: number;
}

export interface RngDeviceState {
  version: 1;
  features: string;
  activated: boolean;
  queues: (SplitQueueState | null)[];
}

/**
 * virtio-rng (virtio 1.2 §5.4): one queue (requestq); the device fills device-writable buffers
 * with entropy from the host CSPRNG and returns how much it wrote. No config space, no
 * device-specific features.
 */
export class RngDevice implements VirtioDevice {
  readonly deviceType = VIRTIO_ID.RNG;
  readonly queueMaxSizes: readonly number[];
  readonly features = featureBit(VIRTIO_F.VERSION_1) | featureBit(VIRTIO_F.INDIRECT_DESC) | featureBit(VIRTIO_F.EVENT_IDX);
  readonly configSize = 0;
  private readonly maxBytes: number;
  private ctx: ActivateContext | undefined;
  private queues: (SplitQueue | undefined)[] = [];

  /** @throws TypevisorError RNG_OPTIONS */
  constructor(opts: RngDeviceOptions = {}) {
    const size = opts.queueSize ?? 256;
    if (!Number.isInteger(size) || size < 1 || size > 32768 || (size & (size - 1)) !== 0) {
      throw new TypevisorError("RNG_OPTIONS", `virtio-rng queue size ${size} is not a power of 2 in 1..32768`);
    }
    const max = opts.maxBytesPerRequest ?? 64 * 1024;
    if (!Number.isInteger(max) || max < 1 || max > 1 << 24) {
      throw new TypevisorError("RNG_OPTIONS", `virtio-rng bytes per request ${max} is not in 1..16777216`);
    }
    this.queueMaxSizes = [size];
    this.maxBytes = max;
  }

  readConfig(_offset: number, _size: number): bigint {
    return 0n;
  }

  writeConfig(_offset: number, _size: number, _value: bigint): void {}

  activate(ctx: ActivateContext): void {
    this.ctx = ctx;
    this.queues = activateQueues(ctx, this.queueMaxSizes);
  }

  restore(ctx: ActivateContext, state: RngDeviceState): void {
    if (state.version !== 1) throw new TypevisorError("SNAPSHOT_VERSION", `virtio-rng state version ${String(state.version)} is not supported`);
    if (!state.activated) return;
    this.ctx = ctx;
    this.queues = activateQueues(ctx, this.queueMaxSizes, state.queues);
  }

  notify(q: number): void {
    const ctx = this.ctx;
    if (ctx === undefined) return;
    serviceQueue(ctx, q, this.queues[q], (chain) => {
      // Readable descriptors carry nothing for this device; we only fill the writable part,
      // from its first byte, so used len is exactly what the driver may consume (§2.7.8).
      let n = 0;
      for (const v of chainSlices(ctx.mem, chain.writable, 0, Math.min(chain.totalWrite, this.maxBytes))) {
        randomFillSync(v);
        n += v.length;
      }
      return n;
    });
  }

  /** Where the queues stand (GET /threads). */
  inspect(): VirtioDeviceInspect {
    return { queues: inspectQueues(this.queues, this.queueMaxSizes.length) };
  }

  reset(): void {
    this.ctx = undefined;
    this.queues = [];
  }

  save(): RngDeviceState {
    return {
      version: 1,
      features: (this.ctx?.features ?? 0n).toString(16),
      activated: this.ctx !== undefined,
      queues: this.queues.map((q) => q?.save() ?? null),
    };
  }
}
