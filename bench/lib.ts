/** Shared pieces of the benchmarks: summary statistics and the report line. */

export function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 === 1 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

/** "label: typevisor X, qemu Y, ratio X/Y" from the medians of both series. */
export function compare(label: string, ours: readonly number[], qemu: readonly number[], digits = 1): string {
  const t = median(ours);
  const q = median(qemu);
  return `${label}: typevisor ${t.toFixed(digits)}, qemu ${q.toFixed(digits)}, ratio ${(t / q).toFixed(2)}`;
}
