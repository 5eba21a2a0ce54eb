/**
 * OpenAPI 3.1 from the route table: the JSON Schemas come from the same zod
 * schemas that validate requests (zod's toJSONSchema, draft 2020-12, which
 * is what OpenAPI 3.1 uses for schema objects).
 */
import { z } from "zod";
import { problemSchema } from "./schemas.js";
import { ROUTES, VERSION, type Route } from "./routes.js";

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
    ...(r.description !== undefined ? { description: r.description } : {}),
    parameters: [...parameters(r.params, "path"), ...parameters(r.query, "query")],
    ...(r.body !== undefined ? { requestBody: { required: !r.body.safeParse(undefined).success, content: { "application/json": { schema: schema(r.body, "input") } } } } : {}),
    responses,
  };
}

export function openApiDocument(): Json {
  const paths: Record<string, Json> = {};
  for (const r of ROUTES) {
    const path = r.url.replace(/:([a-zA-Z]+)/g, "{$1}");
    (paths[path] ??= {})[r.method.toLowerCase()] = operation(r);
  }
  paths["/metrics"] = {
    get: { operationId: "metrics", summary: "Prometheus metrics (host and per VM)", responses: { 200: { description: "text exposition format", content: { "text/plain": {} } } } },
  };
  return {
    openapi: "3.1.0",
    info: { title: "typevisor", version: VERSION, description: "The typevisor daemon's API: VMs on one host, their lifecycle, consoles, resources, events and metrics." },
    paths,
    components: { schemas: { Problem: schema(problemSchema, "output") } },
  };
}
