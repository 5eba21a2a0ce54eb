/**
 * Errors as problem+json (RFC 9457) with a stable code and a human message.
 * Bad input is always 4xx; a 5xx means typevisor itself (or a VMM) failed,
 * and its detail never carries a stack trace.
 */
import { isTypevisorError } from "../errors.js";

export interface Problem {
  type: string;
  title: string;
  status: number;
  code: string;
  detail: string;
  hint?: string;
}

const STATUS: Record<string, number> = {
  INVALID_REQUEST: 400,
  INVALID_ARGUMENT: 400,
  DISK_SIZE: 400,
  DISK_RESIZE: 422,
  FILE_NOT_FOUND: 400,
  PATH_NOT_ALLOWED: 403,
  IMAGE_NOT_FOUND: 400,
  IMAGE_BAD_NAME: 400,
  NOT_FOUND: 404,
  // RFC 9110 §15.5.2/§15.5.4; RFC 6585 §4 (docs/security.md)
  UNAUTHENTICATED: 401,
  FORBIDDEN: 403,
  TOO_MANY_ATTEMPTS: 429,
  USER_NOT_FOUND: 404,
  TOKEN_NOT_FOUND: 404,
  USER_EXISTS: 409,
  LAST_ADMIN: 409,
  MFA_REQUIRED: 403,
  MFA_ENABLED: 409,
  MFA_NOT_ENABLED: 409,
  VM_NOT_FOUND: 404,
  POOL_NOT_FOUND: 404,
  DISK_NOT_FOUND: 404,
  POOL_EXISTS: 409,
  ALERT_RULE_NOT_FOUND: 404,
  ALERT_RULE_EXISTS: 409,
  POOL_IN_USE: 409,
  POOL_PATH: 400,
  VM_EXISTS: 409,
  VM_QUARANTINED: 409,
  VM_STATE: 409,
  SNAPSHOT_NOT_FOUND: 404,
  SNAPSHOT_EXISTS: 409,
  SNAPSHOT_MISMATCH: 409,
  SNAPSHOT_CHAIN: 409,
  SANDBOX_UNSUPPORTED: 409,
  INSUFFICIENT_RESOURCES: 409,
  // RFC 4918 §11.5: the server cannot store what the request needs
  DISK_FULL: 507,
  KVM_UNSUITABLE: 409,
  BODY_TOO_LARGE: 413,
  UNSUPPORTED_MEDIA_TYPE: 415,
  VM_START_FAILED: 502,
  VMM_API: 502,
  VMM_UNREACHABLE: 502,
  VMM_TIMEOUT: 504,
};

export function problem(status: number, code: string, detail: string, hint?: string): Problem {
  return { type: `urn:typevisor:error:${code}`, title: code, status, code, detail, ...(hint !== undefined ? { hint } : {}) };
}

/** Fastify's own errors for malformed requests (bad JSON, wrong content type, too large). */
function fastifyClientError(e: { code?: string; statusCode?: number; message: string }): Problem | undefined {
  const s = e.statusCode;
  if (s === undefined || s < 400 || s >= 500) return undefined;
  const code = e.code === "FST_ERR_CTP_BODY_TOO_LARGE" ? "BODY_TOO_LARGE" : e.code === "FST_ERR_CTP_INVALID_MEDIA_TYPE" ? "UNSUPPORTED_MEDIA_TYPE" : "INVALID_REQUEST";
  return problem(s, code, e.message);
}

export function toProblem(e: unknown): Problem {
  if (isTypevisorError(e)) return problem(STATUS[e.code] ?? (e.code.startsWith("VMM") ? 502 : 500), e.code, e.message, e.hint);
  const fe = fastifyClientError(e as { code?: string; statusCode?: number; message: string });
  if (fe !== undefined) return fe;
  return problem(500, "INTERNAL", "internal error (see the daemon's log)");
}
