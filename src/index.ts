/**
 * The typevisor package: a typed client for the daemon's API and the types it
 * speaks. `import { TypevisorClient } from "typevisor"`.
 */
export { ApiError, TypevisorClient, type ClientTarget, type Health } from "./api/client.js";
export type { HostReport, VmStats } from "./api/schemas.js";
export type { PoolInfo, PoolSpecInput } from "./control/pools.js";
export type { EventRecord, VmExit, VmInfo, VmSpec, VmSpecInput, VmState, VmUsage } from "./control/spec.js";
export { TypevisorError } from "./errors.js";
