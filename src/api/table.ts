/**
 * Every route of the REST table: the VM routes (routes.ts) and users, tokens and the audit log
 * (security-routes.ts), login and MFA (login-routes.ts), the logs (log-routes.ts), snapshots and clones (snapshot-routes.ts). The server, the OpenAPI document and the tests walk this one list.
 */
import { ALERT_ROUTES } from "./alert-routes.js";
import { LOGIN_ROUTES } from "./login-routes.js";
import { LOG_ROUTES } from "./log-routes.js";
import { ROUTES, type Route } from "./routes.js";
import { SECURITY_ROUTES } from "./security-routes.js";
import { SNAPSHOT_ROUTES } from "./snapshot-routes.js";
import { MIGRATION_ROUTES } from "./migration-routes.js";

export const API_ROUTES: readonly Route[] = [...ROUTES, ...SECURITY_ROUTES, ...LOGIN_ROUTES, ...ALERT_ROUTES, ...LOG_ROUTES, ...SNAPSHOT_ROUTES, ...MIGRATION_ROUTES];
