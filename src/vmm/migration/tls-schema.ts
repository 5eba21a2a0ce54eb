/**
 * POST /migrate's `tls`, checked by the VMM API with this schema, then by checkStreamTls
 * (transport.ts) for the PEMs themselves. Apart from transport.ts, which a migration's source
 * loads, so that only a request that brings TLS material loads zod for it.
 */
import { z } from "zod";
import { PEM_MAX, type StreamTls } from "./transport.js";

export const StreamTlsSchema = z.strictObject({
  cert: z.string().min(1).max(PEM_MAX),
  key: z.string().min(1).max(PEM_MAX),
  ca: z.string().min(1).max(PEM_MAX).optional(),
  peerFingerprint: z.string().max(200).optional(),
}) satisfies z.ZodType<StreamTls>;
