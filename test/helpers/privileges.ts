/** What this process's root may grant, which a container's root may not (capabilities(7)). */
import { spawnSync } from "node:child_process";

/**
 * Whether a child can be given RLIMIT_NICE 20 (a hard limit above the inherited one needs
 * CAP_SYS_RESOURCE): the jail's grant to VMMs (control/sandbox/sandbox.ts vmmRlimits) takes
 * effect only then.
 */
export const CAN_GRANT_NICE = process.getuid?.() === 0 && spawnSync("prlimit", ["--nice=20:20", "true"]).status === 0;
