/**
 * Cached L2 tables (qcow2.txt §Cluster mapping), least recently used first. A table changed by a
 * write stays dirty in memory until the image's flush writes it, after the data and refcounts
 * it points at are on disk (see image.ts, flushMetadata). The cache never evicts a dirty table
 * itself: when every table is dirty, the image flushes its metadata first (needsFlush).
 */
export interface L2Table {
  buf: Buffer;
  dirty: boolean;
}

export class L2Cache {
  private readonly tables = new Map<number, L2Table>();
  private dirtyCount = 0;

  constructor(readonly capacity: number) {}

  /** The table asked for last: a request's clusters mostly share one table, so most lookups stop here. */
  private lastOffset = -1;
  private last: L2Table | undefined;

  get(offset: number): L2Table | undefined {
    if (offset === this.lastOffset) return this.last;
    const t = this.tables.get(offset);
    if (t !== undefined) {
      this.lastOffset = offset;
      this.last = t;
      this.tables.delete(offset);
      this.tables.set(offset, t);
    }
    return t;
  }

  /** Whether adding a table requires a metadata flush first (full of dirty tables). */
  needsFlush(): boolean {
    return this.tables.size >= this.capacity && this.dirtyCount >= this.tables.size;
  }

  /** Add a table, evicting the least recently used clean one when full. */
  put(offset: number, t: L2Table): void {
    if (this.tables.size >= this.capacity) {
      for (const [at, old] of this.tables) {
        if (!old.dirty) {
          this.tables.delete(at);
          if (at === this.lastOffset) {
            this.lastOffset = -1;
            this.last = undefined;
          }
          break;
        }
      }
    }
    this.tables.set(offset, t);
    if (t.dirty) this.dirtyCount++;
  }

  markDirty(t: L2Table): void {
    if (t.dirty) return;
    t.dirty = true;
    this.dirtyCount++;
  }

  markClean(t: L2Table): void {
    if (!t.dirty) return;
    t.dirty = false;
    this.dirtyCount--;
  }

  get dirty(): boolean {
    return this.dirtyCount > 0;
  }

  dirtyTables(): [number, L2Table][] {
    return this.dirtyCount === 0 ? [] : [...this.tables].filter(([, t]) => t.dirty);
  }
}
