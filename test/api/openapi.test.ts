/**
 * The OpenAPI document, checked by a validator nobody here wrote against the
 * official OpenAPI 3.1 JSON Schema (the document is built from the route
 * table, so this runs without a daemon).
 */
import { Validator } from "@seriousme/openapi-schema-validator";
import { describe, expect, it } from "vitest";
import { openApiDocument } from "../../src/api/openapi.js";
import { API_ROUTES } from "../../src/api/table.js";

describe("OpenAPI document", () => {
  it("is a valid OpenAPI 3.1 document", async () => {
    const v = new Validator();
    const res = await v.validate(openApiDocument());
    expect(res.errors ?? []).toEqual([]);
    expect(res.valid).toBe(true);
    expect(v.version).toBe("3.1");
    // ...and the validator does reject a broken one.
    const broken = { ...openApiDocument(), info: { title: "typevisor" } };
    expect((await new Validator().validate(broken)).valid).toBe(false);
  });

  it("describes every route, each with a unique operationId", () => {
    const doc = openApiDocument() as { paths: Record<string, Record<string, { operationId: string }>> };
    const ops = Object.values(doc.paths).flatMap((p) => Object.values(p).map((o) => o.operationId));
    expect(new Set(ops).size).toBe(ops.length);
    expect(ops.length).toBe(API_ROUTES.length + 1); // + /metrics
  });
});
