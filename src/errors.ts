/**
 * Typed errors with stable codes. Every layer throws a TypevisorError (or a
 * subclass); the CLI prints `error[CODE]: message` and the API maps codes to
 * problem+json. Never surface a JS stack trace to a user for an expected failure.
 */
export class TypevisorError extends Error {
  readonly code: string;
  /** Optional hint telling the user what to do next. */
  readonly hint: string | undefined;

  constructor(code: string, message: string, options?: { cause?: unknown; hint?: string }) {
    super(message, options?.cause !== undefined ? { cause: options.cause } : undefined);
    this.name = "TypevisorError";
    this.code = code;
    this.hint = options?.hint;
  }
}

export function isTypevisorError(e: unknown): e is TypevisorError {
  return e instanceof TypevisorError;
}
