/**
 * OpenAPI 3.1 from the route table: the JSON Schemas come from the same zod
 * schemas that validate requests (zod's toJSONSchema, draft 2020-12, which
 * is what OpenAPI 3.1 uses for schema objects).
 */
import { z } from "zod";
import { problemSchema } from "./schemas.js";
import { VERSION, type Route } from "./routes.js";
import { API_ROUTES } from "./table.js";

type Json = Record<string, unknown>;

function schema(s: z.ZodType, io: "input" | "output"): Json {
  const j = z.toJSONSchema(s, { io, unrepresentable: "any" }) as Json;
  delete j["$schema"];
  return j;
}

/** Query and path schemas become one parameter per property. */
function parameters(s: z.ZodType | undefined, where: "path" | "query"): Json[] {
  if (s === undefined) return [];
  const j = schema(s, "input") as { properties?: Record<string, Json>; required?: string[] };
  return Object.entries(j.properties ?? {}).map(([name, p]) => ({
    name,
    in: where,
    required: where === "path" || (j.required ?? []).includes(name),
    schema: p,
    ...(typeof p["description"] === "string" ? { description: p["description"] } : {}),
  }));
}

function operation(r: Route): Json {
  const responses: Json = {};
  for (const [status, doc] of Object.entries(r.responses)) {
    responses[status] = {
      description: doc.description,
      ...(doc.schema !== undefined ? { content: { [doc.contentType ?? "application/json"]: { schema: schema(doc.schema, "output") } } } : doc.contentType !== undefined ? { content: { [doc.contentType]: {} } } : {}),
    };
  }
  responses["default"] = { description: "an error (RFC 9457 problem details)", content: { "application/problem+json": { schema: { $ref: "#/components/schemas/Problem" } } } };
  return {
    operationId: r.operationId,
    summary: r.summary,
    description: `${r.description !== undefined ? `${r.description}\n\n` : ""}${r.public === true ? "Needs no credentials" : `Needs the permission \`${r.permission}\``}${r.target !== undefined ? " (within the caller's VM scope)" : ""}${r.hostWide === true ? "; not for callers scoped to VMs" : ""}.`,
    // OpenAPI 3.1 §4.8.10: an empty list lifts the document's security requirement (login is how a token is obtained)
    ...(r.public === true ? { security: [] } : { "x-permission": r.permission }),
    parameters: [...parameters(r.params, "path"), ...parameters(r.query, "query")],
    ...(r.body !== undefined ? { requestBody: { required: !r.body.safeParse(undefined).success, content: { "application/json": { schema: schema(r.body, "input") } } } } : {}),
    responses,
  };
}

export function openApiDocument(): Json {
  const paths: Record<string, Json> = {};
  for (const r of API_ROUTES) {
    const path = r.url.replace(/:([a-zA-Z]+)/g, "{$1}");
    (paths[path] ??= {})[r.method.toLowerCase()] = operation(r);
  }
  paths["/metrics"] = {
    get: { operationId: "metrics", summary: "Prometheus metrics (host and per VM)", description: "Needs the permission `metrics:read`; not for callers scoped to VMs.", "x-permission": "metrics:read", responses: { 200: { description: "text exposition format", content: { "text/plain": {} } } } },
  };
  return {
    openapi: "3.1.0",
    info: { title: "typevisor", version: VERSION, description: "The typevisor daemon's API: VMs on one host, their lifecycle, consoles, resources, events and metrics." },
    paths,
    // Every operation: a bearer token (RFC 6750), or on the unix socket the peer's uid (SO_PEERCRED; docs/security.md).
    security: [{ bearer: [] }],
    components: { schemas: { Problem: schema(problemSchema, "output") }, securitySchemes: { bearer: { type: "http", scheme: "bearer", description: "typevisor token create; the unix socket also maps its peer's uid" } } },
  };
}
