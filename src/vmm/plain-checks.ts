/**
 * Checks for plain data decoded from JSON, without zod: for where loading it costs too much (a
 * migration's source: migration/source.ts) or an object schema per entry is too slow (the
 * state's MSR and CPUID lists: snapshot/state.ts).
 */

export const isU32 = (v: unknown): v is number => typeof v === "number" && Number.isInteger(v) && v >= 0 && v <= 0xffff_ffff;

export const isFiniteNumber = (v: unknown): v is number => typeof v === "number" && Number.isFinite(v);

/**
 * A check that a value is a plain object with exactly the keys of `fields`, each its own and
 * passing its check (no other keys, none inherited). The key list is taken once, here.
 */
export function exactRecord(fields: Readonly<Record<string, (v: unknown) => boolean>>): (v: unknown) => boolean {
  const names = Object.keys(fields);
  const checks = names.map((n) => fields[n]!);
  return (v) => {
    if (typeof v !== "object" || v === null || Array.isArray(v) || Object.keys(v).length !== names.length) return false;
    const r = v as Record<string, unknown>;
    for (let i = 0; i < names.length; i++) {
      if (!Object.hasOwn(r, names[i]!) || !checks[i]!(r[names[i]!])) return false;
    }
    return true;
  };
}
