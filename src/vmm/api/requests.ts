/** The VMM API's request bodies that need a schema (server.ts loads this module on first use). */
import { z } from "zod";

const dirString = z.string().min(1).max(4096).refine((v) => !v.includes("\0"), "no NUL bytes");
/** POST /snapshot's body. */
export const SnapshotRequestSchema = z.strictObject({ path: dirString, memory: z.boolean().optional(), base: dirString.optional(), track: z.boolean().optional() });
export type SnapshotRequest = z.infer<typeof SnapshotRequestSchema>;
