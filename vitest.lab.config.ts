import { defineConfig } from "vitest/config";

// Lab tests: need a real (hardware-like) KVM host. `npm run test:lab` boots one
// lab and runs this whole group inside it, one file at a time (the lab has one CPU).
export default defineConfig({
  test: {
    include: ["src/**/*.lab.test.ts", "test/**/*.lab.test.ts"],
    testTimeout: 600_000,
    hookTimeout: 600_000,
    fileParallelism: false,
    // A test that hangs prints where everything is before its timeout (test/helpers/lab-stall-report.ts).
    setupFiles: ["test/helpers/lab-stall-report.ts"],
    reporters: ["verbose"],
  },
});
