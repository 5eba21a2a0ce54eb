/**
 * An error the daemon answered with (its problem's code, HTTP status and message). In a module of
 * its own so the command line's exit-code table can tell it apart without loading the client and,
 * with it, node:http, node:tls and the TLS helpers, in every VMM process (`typevisor run` maps its
 * errors through the same table; issue 19: each VMM pays for what it loads).
 */
import { TypevisorError } from "../errors.js";

export class ApiError extends TypevisorError {
  constructor(readonly status: number, code: string, message: string, hint?: string) {
    super(code, message, hint !== undefined ? { hint } : undefined);
    this.name = "ApiError";
  }
}
