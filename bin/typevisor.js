#!/usr/bin/env node
// The typevisor CLI. Runs the compiled code in dist/ (built by `npm ci` via the prepare script, or `npm run build`).
import { main } from "../dist/cli/main.js";

const code = await main(process.argv);
process.exitCode = code;
