/**
 * HELLO's schema: the destination checks the first frame with it (protocol.ts has the frame's
 * type). Apart from protocol.ts so the source, which only writes HELLO, loads no zod: its import
 * is the first thing a migrate request waits for (lab: seconds).
 */
import { z } from "zod";
import { SnapshotConfigSchema } from "../snapshot/state.js";
import { MAX_DISK_BYTES, PAGE, type Hello } from "./protocol.js";

export const HelloSchema = z.strictObject({
  magic: z.literal("typevisor-migration"),
  version: z.number().int(),
  config: SnapshotConfigSchema,
  regions: z.array(z.strictObject({ guestPhysAddr: z.number().int().min(0), size: z.number().int().min(PAGE) })).min(1).max(8),
  /**
   * "disks": "copy": each disk's size (what the guest sees) and format, in the configuration's
   * order; its contents come as DISK_DATA. The destination makes its copy in that format (a
   * qcow2 copy standalone: the data of the source's whole backing chain, no backing file).
   */
  disks: z.array(z.strictObject({ size: z.number().int().min(0).max(MAX_DISK_BYTES), format: z.enum(["raw", "qcow2"]).optional() })).max(64).optional(),
}) satisfies z.ZodType<Hello>;
