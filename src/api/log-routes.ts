/**
 * GET /v1/logs: the daemon's own log and a VM's VMM log, searched (control/logs.ts); with
 * ?follow=true the matching backlog, then new lines as they are written, as JSON lines
 * (application/x-ndjson: one LogLine per line), for a person (`typevisor logs -f`) or a log
 * shipper.
 */
import { Writable } from "node:stream";
import { z } from "zod";
import { DEFAULT_SOURCES, LOG_LEVELS, LOG_SOURCES, LineSplitter, matches, parseDaemonLine, readLogs, vmmLine, type LogLine, type LogQuery, type LogSource } from "../control/logs.js";
import { followConsole } from "./console.js";
import { HANDLED, route, type Route } from "./routes.js";
import { boolString, isoTime, vmName } from "./schemas.js";

export const logsQuery = z
  .object({
    vm: vmName.optional().describe("only lines about this VM, and its VMM's log"),
    since: isoTime.optional().describe("ISO 8601: lines written at or after this"),
    contains: z.string().min(1).max(200).optional().describe("case-insensitive substring of the message or its fields"),
    level: z.enum(LOG_LEVELS).optional().describe("this level and above"),
    source: z
      .string()
      .max(40)
      .transform((v, ctx) => {
        const parts = v.split(",");
        if (!parts.every((p): p is LogSource => (LOG_SOURCES as readonly string[]).includes(p))) {
          ctx.addIssue({ code: "custom", message: `comma-separated, of ${LOG_SOURCES.join(", ")}` });
          return z.NEVER;
        }
        return [...new Set(parts)];
      })
      .optional()
      .describe(`which logs, comma-separated: ${LOG_SOURCES.join(", ")} (default ${DEFAULT_SOURCES.join(",")}; vmm and console need vm)`),
    limit: z.coerce.number().int().min(1).max(10_000).optional().describe("the latest N lines (default 1000; with follow: of the backlog, default 100)"),
    follow: boolString.optional().describe("stream: the backlog, then new lines as JSON lines (application/x-ndjson)"),
  })
  .strict();

export const logLine = z.object({
  time: z.string().nullable().describe("ISO 8601; null for a VMM log line read back (the VMM writes no timestamps)"),
  level: z.enum(LOG_LEVELS),
  source: z.enum(LOG_SOURCES),
  vm: z.string().optional(),
  msg: z.string(),
  fields: z.record(z.string(), z.unknown()).optional().describe("the line's structured data (event, err, ...)"),
});
export const logList = z.object({ lines: z.array(logLine) });

/** A follower whose connection holds this much unsent is cut off (it resumes with ?since=). */
const LOG_STREAM_HIGH_WATER = 1024 * 1024;

export const LOG_ROUTES: Route[] = [
  route({
    method: "GET", url: "/v1/logs", operationId: "logs",
    summary: "The daemon's log (and with ?vm=NAME that VM's lines and its VMM's log), searched; ?follow=true streams JSON lines",
    description: "Lines are the daemon's structured log (pino) and, for a named VM, its VMM process's output and (source=console) its serial console. `contains` is a plain substring, never a pattern. A caller scoped to VMs must name one of its VMs.",
    query: logsQuery, permission: "vm:read", target: "query",
    responses: { 200: { description: "lines, oldest first (follow: application/x-ndjson, one line object per line)", schema: logList } },
    handler: async ({ manager, query, reply, request }) => {
      const paths = manager.logPaths(query.vm);
      const filter: Omit<LogQuery, "limit"> = {
        ...(query.vm !== undefined ? { vm: query.vm } : {}),
        ...(query.since !== undefined ? { since: query.since } : {}),
        ...(query.contains !== undefined ? { contains: query.contains } : {}),
        ...(query.level !== undefined ? { level: query.level } : {}),
      };
      const sources: readonly LogSource[] = query.source ?? DEFAULT_SOURCES;
      if (query.follow !== true) return { lines: readLogs(paths, { ...filter, sources, limit: query.limit ?? 1000 }) };
      reply.hijack();
      const res = reply.raw;
      res.writeHead(200, { "content-type": "application/x-ndjson", "cache-control": "no-store" });
      res.flushHeaders();
      for (const l of readLogs(paths, { ...filter, sources, limit: query.limit ?? 100 })) res.write(`${JSON.stringify(l)}\n`);
      const send = (l: LogLine): void => {
        if (!matches(l, filter)) return;
        // The files are the buffer: a client that does not keep up is cut off, not buffered for.
        if (res.writableLength > LOG_STREAM_HIGH_WATER) {
          res.destroy();
          return;
        }
        res.write(`${JSON.stringify(l)}\n`);
      };
      const sink = (onLine: (text: string) => void): Writable => {
        const split = new LineSplitter(onLine);
        return new Writable({
          write(chunk: Buffer, _enc, cb) {
            split.push(chunk);
            cb();
          },
        });
      };
      const stops: (() => void)[] = [];
      if (sources.includes("daemon")) {
        stops.push(followConsole(paths.daemon, sink((text) => {
          const l = parseDaemonLine(text);
          if (l !== undefined) send(l);
        })));
      }
      const vm = query.vm;
      for (const source of ["vmm", "console"] as const) {
        const path = paths[source];
        if (path !== undefined && vm !== undefined && sources.includes(source)) stops.push(followConsole(path, sink((text) => send(vmmLine(text, vm, new Date().toISOString(), source)))));
      }
      // A quiet log for an hour is normal: an empty line now and then keeps proxies from closing the stream.
      const keepAlive = setInterval(() => res.write("\n"), 15_000);
      const end = (): void => {
        clearInterval(keepAlive);
        for (const s of stops) s();
      };
      request.raw.on("close", end);
      res.once("close", end);
      return HANDLED;
    },
  }),
];
