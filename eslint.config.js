// Lint is part of `npm test`. Layering (imports point down only) is enforced by
// test/layers.test.ts, which reads the import graph.
import js from "@eslint/js";
import tseslint from "typescript-eslint";

export default tseslint.config(
  { ignores: ["dist/**", "dist-bench/**", "node_modules/**", "coverage/**"] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    rules: {
      "@typescript-eslint/no-unused-vars": ["error", { argsIgnorePattern: "^_", varsIgnorePattern: "^_" }],
      "@typescript-eslint/no-explicit-any": "error",
      "no-constant-condition": ["error", { checkLoops: false }],
    },
  },
  {
    // the web console's page script (docs/web.md): a browser script, not a module; its globals are the browser's and the vendored libraries'
    files: ["web/**/*.js"],
    languageOptions: {
      sourceType: "script",
      globals: Object.fromEntries(
        ["window", "document", "location", "fetch", "console", "setInterval", "clearInterval", "setTimeout", "clearTimeout", "confirm", "prompt", "EventSource", "WebSocket", "TextEncoder", "URLSearchParams", "Node", "Element", "uPlot", "Terminal", "FitAddon"].map((g) => [g, "readonly"]),
      ),
    },
  },
  {
    files: ["bin/**/*.js"],
    languageOptions: { globals: { process: "readonly", console: "readonly" } },
  },
);
