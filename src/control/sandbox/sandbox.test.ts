import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { Store } from "../store.js";
import { allocateUid, parseUidRange } from "./sandbox.js";

describe("sandbox uids", () => {
  const dirs: string[] = [];
  afterEach(() => {
    for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
  });
  const store = (): Store => {
    const d = mkdtempSync(join(tmpdir(), "tvsb-"));
    dirs.push(d);
    return new Store(join(d, "typevisor.db"));
  };
  const vm = (s: Store, id: string): void => {
    s.db.prepare("INSERT INTO vms (id, name, spec, state, created_at, updated_at, dir, disks) VALUES (?, ?, '{}', 'stopped', '', '', '/x', '[]')").run(id, `n-${id}`);
  };

  it("parses FIRST-LAST and FIRST:COUNT, refusing root and the invalid uid", () => {
    expect(parseUidRange("1000-1009")).toEqual({ base: 1000, count: 10 });
    expect(parseUidRange("5:3")).toEqual({ base: 5, count: 3 });
    for (const bad of ["0-10", "10-5", "1:0", "4294967290:10", "x", "1-", "-1-5"]) expect(() => parseUidRange(bad), bad).toThrow(/--sandbox-uids/);
  });

  it("gives each VM its own uid, keeps it across starts, frees it when the VM is gone, and says when the range is used up", () => {
    const s = store();
    for (const id of ["a", "b", "c"]) vm(s, id);
    expect(allocateUid(s.db, "a", 100, 2)).toBe(100);
    expect(allocateUid(s.db, "b", 100, 2)).toBe(101);
    expect(allocateUid(s.db, "a", 100, 2)).toBe(100);
    expect(() => allocateUid(s.db, "c", 100, 2)).toThrow(/all 2 sandbox uids/);
    s.db.prepare("DELETE FROM vms WHERE id = 'a'").run();
    expect(allocateUid(s.db, "c", 100, 2)).toBe(100);
    // a range changed under a VM: it gets one from the new range
    expect(allocateUid(s.db, "b", 200, 5)).toBe(200);
    s.close();
  });
});
