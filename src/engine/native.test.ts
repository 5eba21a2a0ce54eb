/** What a VMM's environment holds (native.ts vmmEnv): the daemon's own stays out. */
import { describe, expect, it } from "vitest";
import { vmmEnv } from "./native.js";

describe("vmmEnv", () => {
  it("holds PATH and the VM's id only, whatever the daemon's environment has", () => {
    const env = vmmEnv("vm1", { PATH: "/bin", NODE_OPTIONS: "--require /tmp/x.js", TYPEVISOR_TOKEN: "secret", TYPEVISOR_TRACE_PHASES: "yes" });
    expect(env).toEqual({ PATH: "/bin", TYPEVISOR_VM_ID: "vm1" });
  });

  it("passes the phase marks' switch on, as exactly the value that turns them on", () => {
    expect(vmmEnv("vm1", { PATH: "/bin", TYPEVISOR_TRACE_PHASES: "1" })).toEqual({ PATH: "/bin", TYPEVISOR_VM_ID: "vm1", TYPEVISOR_TRACE_PHASES: "1" });
  });
});
