import { ApiError } from "../../src/api/client.js";
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

/** How an API call ended: "ok", or "STATUS CODE" of the ApiError it threw (any other error is rethrown). */
export async function outcome(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (e) {
    if (e instanceof ApiError) return `${e.status} ${e.code}`;
    throw e;
  }
  return "ok";
}
