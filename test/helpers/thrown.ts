import { TypevisorError } from "../../src/errors.js";

/** The TypevisorError `f` throws (any other error is rethrown; not throwing fails). */
export function thrown(f: () => void): TypevisorError {
  try {
    f();
  } catch (e) {
    if (e instanceof TypevisorError) return e;
    throw e;
  }
  throw new Error("did not throw");
}
