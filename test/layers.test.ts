/**
 * Imports point down only (docs: architecture "Layers"): a module may import
 * from its own layer or a lower one, never a higher one. Reads every source
 * file's import specifiers; test files are exempt.
 */
import { readdirSync, readFileSync, statSync } from "node:fs";
import { join, relative, resolve, dirname } from "node:path";
import { describe, expect, it } from "vitest";

const SRC = resolve(new URL("../src", import.meta.url).pathname);

/** Lower number = lower layer. */
const LAYER: Record<string, number> = {
  "errors.ts": 0,
  // Plain value parsing/formatting, free of I/O: usable from every layer, like errors.ts.
  "size.ts": 0,
  "index.ts": 8,
  sys: 1,
  kvm: 2,
  vmm: 3,
  engine: 4,
  images: 5,
  lab: 5,
  control: 5,
  cluster: 5,
  api: 6,
  cli: 7,
  web: 7,
};

function files(dir: string): string[] {
  return readdirSync(dir).flatMap((f) => {
    const p = join(dir, f);
    if (statSync(p).isDirectory()) return files(p);
    return p.endsWith(".ts") && !p.endsWith(".test.ts") && !p.endsWith("test-fixtures.ts") ? [p] : [];
  });
}

function layerOf(file: string): { name: string; level: number } {
  const top = relative(SRC, file).split("/")[0]!;
  const level = LAYER[top];
  if (level === undefined) throw new Error(`no layer assigned to src/${top}: add it to test/layers.test.ts`);
  return { name: top, level };
}

describe("layering", () => {
  it("every import in src/ points to the same or a lower layer", () => {
    const violations: string[] = [];
    for (const f of files(SRC)) {
      const from = layerOf(f);
      const text = readFileSync(f, "utf8");
      for (const m of text.matchAll(/(?:import|export)[^"']*?from\s+["'](\.[^"']+)["']|import\(\s*["'](\.[^"']+)["']\s*\)/g)) {
        const spec = m[1] ?? m[2]!;
        const target = resolve(dirname(f), spec).replace(/\.js$/, ".ts");
        const to = layerOf(target);
        if (to.level > from.level) violations.push(`${relative(SRC, f)} (${from.name}) imports ${spec} (${to.name})`);
      }
    }
    expect(violations).toEqual([]);
  });
});
