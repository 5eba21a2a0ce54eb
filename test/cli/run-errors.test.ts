/**
 * `typevisor run` with bad input: one clear line, a non-zero exit, and no VM
 * (nor lab) started. Runs the real CLI from dist/.
 */
import { spawnSync } from "node:child_process";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { fakeBzImage } from "../../src/vmm/arch/x86_64/boot/test-fixtures.js";

const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;
const dir = mkdtempSync(join(tmpdir(), "tv-cli-"));
const kernel = join(dir, "bzImage");
writeFileSync(kernel, fakeBzImage());

function run(args: string[]) {
  const r = spawnSync(process.execPath, [BIN, "run", ...args], { encoding: "utf8", timeout: 20_000 });
  const lines = r.stderr.trim().split("\n");
  return { status: r.status, first: lines[0] ?? "", stderr: r.stderr };
}

describe("typevisor run rejects bad input with one line", () => {
  it.each([
    ["a missing kernel", ["--kernel", join(dir, "nope")], /error\[FILE_NOT_FOUND\]: kernel .*nope: no such file/],
    ["a truncated kernel", ["--kernel", "TRUNC"], /error\[KERNEL_INVALID\]/],
    ["a file that is no kernel", ["--kernel", "JUNK"], /error\[KERNEL_INVALID\]: invalid kernel image: neither a bzImage/],
    ["an initrd larger than memory", ["--kernel", kernel, "--initrd", "BIG", "--memory", "64"], /error\[INITRD_TOO_LARGE\]/],
    ["--cpus 0", ["--kernel", kernel, "--cpus", "0"], /error\[INVALID_CPUS\]: --cpus must be a whole number of at least 1/],
    ["--memory too small", ["--kernel", kernel, "--memory", "8"], /error\[INVALID_MEMORY\]: --memory must be at least 64 MiB/],
    ["--memory not a number", ["--kernel", kernel, "--memory", "lots"], /error\[INVALID_ARGUMENT\]: --memory must be a whole number/],
    ["--memory past the 4 TiB ceiling", ["--kernel", kernel, "--memory", String(4 * 1024 * 1024 + 1)], /error\[INVALID_MEMORY\]: --memory 4194305 MiB exceeds the supported maximum of 4194304 MiB/],
    ["--cpus past the most KVM allows", ["--kernel", kernel, "--cpus", "4097"], /error\[INVALID_CPUS\]: --cpus 4097 exceeds the maximum of 4096/],
    ["--memory-overcommit 0", ["--kernel", kernel, "--memory-overcommit", "0"], /error\[INVALID_ARGUMENT\]: --memory-overcommit must be a number above 0 and at most 64/],
    ["--memory-overcommit not a number", ["--kernel", kernel, "--memory-overcommit", "lots"], /error\[INVALID_ARGUMENT\]: --memory-overcommit must be a positive number/],
    ["--vcpu-nice beyond 19", ["--kernel", kernel, "--vcpu-nice", "20"], /error\[INVALID_ARGUMENT\]: --vcpu-nice must be a whole number from 0 to 19 \(got 20\)/],
    ["--vcpu-nice negative", ["--kernel", kernel, "--vcpu-nice", "-1"], /error\[INVALID_ARGUMENT\]: --vcpu-nice must be a whole number/],
    ["nothing to boot", [], /error\[INVALID_ARGUMENT\]: nothing to boot/],
    // The migration stream's security (docs/migration.md, "Transport security"): checked before anything is built.
    ["--incoming over TCP with neither TLS nor --plain-tcp", ["--incoming", "tcp:127.0.0.1:7999"], /error\[INVALID_REQUEST\]: a migration over TCP .* carries the guest's memory/],
    ["--tls-cert without --tls-key", ["--incoming", "tcp:127.0.0.1:7999", "--tls-cert", kernel], /error\[INVALID_ARGUMENT\]: TLS for the migration stream needs both --tls-cert and --tls-key/],
    ["--tls-cert that is no certificate", ["--incoming", "tcp:127.0.0.1:7999", "--tls-cert", kernel, "--tls-key", kernel, "--tls-peer-fingerprint", "00".repeat(32)], /error\[INVALID_REQUEST\]: the migration TLS certificate is not a PEM certificate/],
    ["--plain-tcp without --incoming", ["--kernel", kernel, "--plain-tcp"], /error\[INVALID_ARGUMENT\]: --tls-\* and --plain-tcp are for --incoming/],
  ])("%s", (_name, args, expected) => {
    const files: Record<string, () => Uint8Array> = {
      TRUNC: () => fakeBzImage().subarray(0, 0x300),
      JUNK: () => new Uint8Array(8192).fill(0x41),
      BIG: () => new Uint8Array(80 * 1024 * 1024),
    };
    const real = args.map((a) => {
      const make = files[a];
      if (make === undefined) return a;
      const p = join(dir, a);
      writeFileSync(p, make());
      return p;
    });
    const r = run(real);
    expect(r.status, r.stderr).toBe(2);
    expect(r.first).toMatch(/^typevisor: error\[/);
    expect(r.first).toMatch(expected);
    expect(r.stderr).not.toMatch(/\n\s+at /); // no stack trace
  });
});
