#!/usr/bin/env node
// Runs a command inside the KVM lab (see docs/lab.md). Needs `npm run build` first.
import { main } from "../dist/lab/cli.js";

process.exitCode = await main(process.argv.slice(2));
