#!/usr/bin/env node
// The typevisor CLI. Runs the bundled build in dist/bundle/ (made by `npm ci` via the prepare script, or `npm run build`: bin/bundle.js).
import { main } from "../dist/bundle/cli.js";

const code = await main(process.argv);
process.exitCode = code;
