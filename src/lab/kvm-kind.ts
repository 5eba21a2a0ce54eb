/**
 * What kind of KVM this host offers, and whether we are inside the lab.
 * The project's machines serve /dev/kvm from the kvm_pvm module (software nested virtualization,
 * unable to boot stock kernels: see docs/lab.md); code that needs hardware-like KVM re-runs itself
 * in the lab when hostKvmKind() is "pvm".
 */
import { kvmHostKind, type KvmHostKind } from "../kvm/kvm.js";

export type KvmKind = KvmHostKind;
/** The lab's name for kvm/kvm.ts kvmHostKind (one implementation). */
export const hostKvmKind = kvmHostKind;

/** Set by the lab for the command it runs. */
export const IN_LAB_ENV = "TYPEVISOR_IN_LAB";

export function isInLab(env: Record<string, string | undefined> = process.env): boolean {
  return env[IN_LAB_ENV] === "1";
}
