/**
 * Local APIC LVT setup for the virtual-wire mode firmware leaves behind:
 * LINT0 delivers ExtINT (the 8259 PIC's output), LINT1 delivers NMI
 * (Intel SDM vol. 3 §10.5.1, MP spec 1.4 §3.6.2.2). Linux relies on this when
 * it probes the legacy PIC timer path.
 */
import type { VcpuFd } from "../../../kvm/kvm.js";

const APIC_LVT0 = 0x350;
const APIC_LVT1 = 0x360;
const DM_MASK = 0x700;
const DM_EXTINT = 0x700;
const DM_NMI = 0x400;

export function setLint(vcpu: VcpuFd): void {
  const st = vcpu.getLapic();
  const dv = new DataView(st.buffer, st.byteOffset, st.byteLength);
  dv.setUint32(APIC_LVT0, (dv.getUint32(APIC_LVT0, true) & ~DM_MASK) | DM_EXTINT, true);
  dv.setUint32(APIC_LVT1, (dv.getUint32(APIC_LVT1, true) & ~DM_MASK) | DM_NMI, true);
  vcpu.setLapic(st);
}
