// The GitHub action's steps (action.yml): no logic of their own. Each maps
// the action's inputs to ci/tern-ci.sh's variables and runs the script, so
// the GitHub action, the GitLab template and a plain shell job share one
// tested implementation. A JavaScript action, not a composite one, because
// only JavaScript actions have a post step: `down` runs after the job's
// last step, whether the job passed or failed.
'use strict';

const { spawnSync } = require('child_process');
const fs = require('fs');
const path = require('path');

// Input name -> tern-ci.sh variable.
const INPUTS = {
  lighthouse: 'TERN_LIGHTHOUSE',
  'lighthouse-tcp': 'TERN_LIGHTHOUSE_TCP',
  transport: 'TERN_TRANSPORT',
  kubeconfig: 'TERN_KUBECONFIG',
  ca: 'TERN_CA',
  token: 'TERN_TOKEN',
  'oidc-audience': 'TERN_OIDC_AUDIENCE',
  'wait-for': 'TERN_WAIT_FOR',
  'wait-timeout': 'TERN_WAIT_TIMEOUT',
  mode: 'TERN_MODE',
  version: 'TERN_VERSION',
  sha256: 'TERN_SHA256',
  routes: 'TERN_ROUTES',
  dns: 'TERN_DNS',
  forwards: 'TERN_FORWARDS',
  'extra-config': 'TERN_EXTRA_CONFIG',
  'state-dir': 'TERN_STATE_DIR',
};

// The runner passes input NAME as INPUT_NAME (upper case, spaces as _).
function input(name) {
  const value = process.env[`INPUT_${name.replace(/ /g, '_').toUpperCase()}`];
  return (value || '').trim();
}

function script(command, env) {
  const file = path.join(__dirname, '..', 'tern-ci.sh');
  const run = spawnSync('bash', [file, command], { env, stdio: 'inherit' });
  if (run.error) {
    process.stdout.write(`::error title=tern-ci::could not run ${file}: ${run.error.message}\n`);
    return 1;
  }
  return run.status === null ? 1 : run.status;
}

// Saved for the post step (GitHub's GITHUB_STATE file; the post step sees
// it as STATE_<name>).
function saveState(name, value) {
  if (process.env.GITHUB_STATE) {
    fs.appendFileSync(process.env.GITHUB_STATE, `${name}=${value}\n`);
  }
}

function environment() {
  const env = { ...process.env };
  for (const [name, variable] of Object.entries(INPUTS)) {
    const value = input(name);
    if (value !== '') {
      env[variable] = value;
    }
  }
  return env;
}

exports.main = function main() {
  const command = input('command') || 'up';
  if (command !== 'up' && command !== 'down') {
    process.stdout.write(`::error title=tern-ci::command: "${command}" is neither up nor down\n`);
    process.exit(2);
  }
  const env = environment();
  if (command === 'up') {
    // Even a failed up may have left a node or a state directory behind.
    saveState('tern_up', 'true');
  }
  process.exit(script(command, env));
};

exports.post = function post() {
  // Only after an `up` of this step: a `command: down` step needs no post.
  if (process.env.STATE_tern_up !== 'true') {
    return;
  }
  process.exit(script('down', environment()));
};
