import { defineConfig } from "vitest/config";

// Unit tests: run anywhere, no KVM needed (tiny-guest tests skip themselves
// when /dev/kvm is absent). Lab tests (*.lab.test.ts) run only inside the lab.
export default defineConfig({
  test: {
    include: ["src/**/*.test.ts", "test/**/*.test.ts", "bench/**/*.test.ts"],
    exclude: ["**/*.lab.test.ts", "node_modules/**", "dist/**"],
    testTimeout: 30_000,
    // A test that times out reports the processes it left running (what a hung VMM was doing).
    setupFiles: ["test/helpers/unit-stall-report.ts"],
  },
});
