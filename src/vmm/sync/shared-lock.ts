/**
 * A mutex over one Int32 slot of a SharedArrayBuffer, for device state that
 * several vCPU threads (and the main thread) touch. Uncontended cost is one
 * compareExchange; contended waiters sleep in Atomics.wait instead of spinning.
 */
export class SharedLock {
  constructor(private readonly cells: Int32Array, private readonly index = 0) {}

  lock(): void {
    const a = this.cells;
    const i = this.index;
    // 0 = free, 1 = held, 2 = held with waiters (the classic futex mutex shape).
    let c = Atomics.compareExchange(a, i, 0, 1);
    if (c === 0) return;
    do {
      if (c === 2 || Atomics.compareExchange(a, i, 1, 2) !== 0) Atomics.wait(a, i, 2, 10);
      c = Atomics.compareExchange(a, i, 0, 2);
    } while (c !== 0);
  }

  unlock(): void {
    if (Atomics.sub(this.cells, this.index, 1) !== 1) {
      Atomics.store(this.cells, this.index, 0);
      Atomics.notify(this.cells, this.index, 1);
    }
  }

  with<T>(fn: () => T): T {
    this.lock();
    try {
      return fn();
    } finally {
      this.unlock();
    }
  }
}
