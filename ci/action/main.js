// The action's main step: ci/tern-ci.sh up (or the `command` input).
require('./run.js').main();
