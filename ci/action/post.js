// The action's post step: ci/tern-ci.sh down, after the job's steps.
require('./run.js').post();
