import { describe, expect, it } from "vitest";
import { KVM } from "./ioctls.js";

/*
 * The request numbers as linux/kvm.h computes them (printed by a C program built against this
 * host's kernel headers, 6.x): a struct size written wrong here would make the kernel refuse the
 * call with ENOTTY, or worse, read the wrong number of bytes.
 */
const FROM_HEADERS: Record<string, number> = {
  GET_MSR_INDEX_LIST: 0xc004ae02, GET_MSRS: 0xc008ae88, GET_XSAVE: 0x9000aea4, SET_XSAVE: 0x5000aea5,
  GET_XSAVE2: 0x9000aecf, GET_XCRS: 0x8188aea6, SET_XCRS: 0x4188aea7, GET_DEBUGREGS: 0x8080aea1,
  SET_DEBUGREGS: 0x4080aea2, GET_VCPU_EVENTS: 0x8040ae9f, SET_VCPU_EVENTS: 0x4040aea0,
  GET_IRQCHIP: 0xc208ae62, SET_IRQCHIP: 0x8208ae63, GET_PIT2: 0x8070ae9f, SET_PIT2: 0x4070aea0,
  GET_CLOCK: 0x8030ae7c, SET_CLOCK: 0x4030ae7b, GET_TSC_KHZ: 0xaea3, SET_TSC_KHZ: 0xaea2,
  KVMCLOCK_CTRL: 0xaead, GET_CPUID2: 0xc008ae91, GET_MP_STATE: 0x8004ae98,
  TRANSLATE: 0xc018ae85,
};

describe("KVM ioctl numbers", () => {
  it.each(Object.entries(FROM_HEADERS))("%s matches linux/kvm.h", (name, value) => {
    expect((KVM as Record<string, number>)[name]).toBe(value);
  });
});
