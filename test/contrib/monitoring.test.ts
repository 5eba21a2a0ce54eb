/**
 * contrib/prometheus/typevisor-rules.yml and contrib/grafana/typevisor-dashboard.json, checked
 * without promtool or Grafana: their structure, and every metric, label value and variable they name
 * against what a real daemon's /metrics serves (a defined VM gives the per-VM series their labels).
 */
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parse as parseYaml } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startDaemon, type TestDaemon } from "../helpers/daemon.js";
import { writeTinyKernel } from "../helpers/tiny-kernel.js";

const root = new URL("../../contrib/", import.meta.url).pathname;

interface Scrape {
  /** Metric names from `# TYPE` lines (a gauge without samples yet still has one). */
  names: Set<string>;
  /** Sample lines: name and labels. */
  samples: { name: string; labels: Record<string, string> }[];
}

function parseScrape(text: string): Scrape {
  const names = new Set<string>();
  const samples: Scrape["samples"] = [];
  for (const line of text.split("\n")) {
    const t = /^# TYPE (\S+) /.exec(line);
    if (t !== null) names.add(t[1]!);
    const s = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? \S+$/.exec(line);
    if (s !== null) samples.push({ name: s[1]!, labels: Object.fromEntries([...(s[2] ?? "").matchAll(/(\w+)="([^"]*)"/g)].map((m) => [m[1]!, m[2]!])) });
  }
  return { names, samples };
}

/** Every `metric{matchers}` or bare `typevisor_*` metric in a PromQL expression. */
function selectors(expr: string): { name: string; matchers: { label: string; op: string; value: string }[] }[] {
  const out: ReturnType<typeof selectors> = [];
  for (const m of expr.matchAll(/\b([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?/g)) {
    const name = m[1]!;
    if (!name.startsWith("typevisor_") && name !== "up") continue;
    const body = m[3] ?? "";
    const matchers = [...body.matchAll(/\s*(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"\s*,?/g)].map((x) => ({ label: x[1]!, op: x[2]!, value: x[3]! }));
    // what the matcher regex did not consume is a syntax error
    expect(body.replace(/\s*(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"\s*,?/g, "").trim(), `matchers of ${name} in ${expr}`).toBe("");
    out.push({ name, matchers });
  }
  return out;
}

function balanced(expr: string): boolean {
  let depth = 0;
  for (const c of expr.replace(/"[^"]*"/g, "")) {
    if (c === "(" || c === "{" || c === "[") depth++;
    if (c === ")" || c === "}" || c === "]") depth--;
    if (depth < 0) return false;
  }
  return depth === 0;
}

describe("monitoring contrib files against a real daemon's /metrics", () => {
  let d: TestDaemon;
  let dir: string;
  let scrape: Scrape;

  /** The metric exists; and where it has samples, one matches every equality matcher on a fixed value. */
  function checkSelector(sel: ReturnType<typeof selectors>[number], where: string): void {
    if (sel.name === "up") return; // Prometheus's own
    expect(scrape.names, `${sel.name} in ${where}`).toContain(sel.name);
    const fixed = sel.matchers.filter((m) => m.op === "=" && !m.value.includes("$"));
    const have = scrape.samples.filter((s) => s.name === sel.name);
    if (have.length === 0 || fixed.length === 0) return;
    expect(have.some((s) => fixed.every((m) => s.labels[m.label] === m.value)), `${sel.name}{${fixed.map((m) => `${m.label}="${m.value}"`).join(",")}} in ${where}: no such series`).toBe(true);
  }

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "tvmon-"));
    writeTinyKernel(join(dir, "tiny.bin"));
    d = await startDaemon({ args: ["--allow-files", dir] });
    await d.client.createVm({ name: "mon1", kernel: join(dir, "tiny.bin"), memoryMiB: 64, rng: false });
    await d.client.createPool({ name: "p1", path: dir });
    scrape = parseScrape(await d.client.metrics());
  }, 30_000);

  afterAll(async () => {
    await d?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it("the Prometheus rules file: groups of well-formed alerting rules over metrics the daemon serves", () => {
    const doc = parseYaml(readFileSync(join(root, "prometheus/typevisor-rules.yml"), "utf8")) as { groups: { name: string; rules: Record<string, unknown>[] }[] };
    expect(Object.keys(doc)).toEqual(["groups"]);
    const names = new Set<string>();
    let n = 0;
    for (const g of doc.groups) {
      expect(typeof g.name).toBe("string");
      for (const r of g.rules) {
        n++;
        expect(Object.keys(r).sort(), JSON.stringify(r)).toEqual(["alert", "annotations", "expr", "for", "labels"].filter((k) => k in r).sort());
        expect(r["alert"]).toMatch(/^Typevisor[A-Z][A-Za-z]+$/);
        expect(names.has(r["alert"] as string), `${String(r["alert"])} twice`).toBe(false);
        names.add(r["alert"] as string);
        expect(r["for"]).toMatch(/^\d+[smh]$/);
        const expr = r["expr"] as string;
        expect(balanced(expr), expr).toBe(true);
        expect(expr).toMatch(/[<>=]=?\s*[\d.]+\s*$/); // a comparison: an alerting expression
        for (const sel of selectors(expr)) checkSelector(sel, String(r["alert"]));
        const labels = (r["labels"] ?? {}) as Record<string, string>;
        expect(["warning", "critical", "{{ $labels.severity }}"]).toContain(labels["severity"]);
        const ann = r["annotations"] as Record<string, string>;
        expect(typeof ann["summary"]).toBe("string");
        expect(typeof ann["description"]).toBe("string");
      }
    }
    expect(n).toBeGreaterThanOrEqual(8);
    // the daemon's own alerts are exported for it, and an audit-log outage has a rule
    expect([...names]).toEqual(expect.arrayContaining(["TypevisorAlertFiring", "TypevisorAuditWriteFailing", "TypevisorVmCrashed"]));
  });

  it("the Grafana dashboard: panels laid out on the 24-column grid, each query over metrics the daemon serves, variables defined", () => {
    const dash = JSON.parse(readFileSync(join(root, "grafana/typevisor-dashboard.json"), "utf8")) as {
      title: string; uid: string; schemaVersion: number;
      templating: { list: { name: string; type: string; query: unknown }[] };
      panels: { id: number; title: string; type: string; gridPos: { x: number; y: number; w: number; h: number }; targets: { refId: string; expr: string }[] }[];
    };
    expect(dash.title).toBe("typevisor");
    expect(dash.uid).toMatch(/^[a-z0-9-]{1,40}$/);
    expect(dash.schemaVersion).toBeGreaterThanOrEqual(30);
    const vars = new Set(dash.templating.list.map((v) => v.name));
    expect([...vars]).toEqual(["datasource", "instance", "vm"]);
    const ids = new Set<number>();
    const cells = new Set<string>();
    for (const p of dash.panels) {
      expect(ids.has(p.id)).toBe(false);
      ids.add(p.id);
      expect(["timeseries", "stat", "gauge"]).toContain(p.type);
      const { x, y, w, h } = p.gridPos;
      expect(x >= 0 && w > 0 && x + w <= 24 && y >= 0 && h > 0, `${p.title} gridPos`).toBe(true);
      // no two panels on one grid cell
      for (let i = x; i < x + w; i++) for (let j = y; j < y + h; j++) {
        expect(cells.has(`${i},${j}`), `${p.title} overlaps`).toBe(false);
        cells.add(`${i},${j}`);
      }
      expect(p.targets.length).toBeGreaterThan(0);
      for (const t of p.targets) {
        expect(balanced(t.expr), t.expr).toBe(true);
        for (const v of t.expr.matchAll(/\$(\w+)/g)) expect(vars.has(v[1]!) || v[1]!.startsWith("__"), `$${v[1]!} in ${p.title}`).toBe(true);
        for (const sel of selectors(t.expr)) checkSelector(sel, p.title);
      }
    }
    for (const v of dash.templating.list.filter((x) => x.type === "query")) {
      for (const sel of selectors((v.query as { query: string }).query)) checkSelector(sel, `variable ${v.name}`);
    }
  });
});
