#!/bin/bash
# A cutoff below the centre's loss: there is no basin. naive / is / gaussian print
# "heavy-tailed weights or too few draws" (not the reason), the axes preconditioner
# fails with "curvature holds NaN or infinite values", mcmc names the reason.
set -u
R=$(mktemp -d)
mf() { PYTHONPATH=/tmp/hunt5 /work/main/.venv/bin/python -m minefield --threads 1 --root "$R" "$@"; }
mf train --name tiny --dataset swissroll --model mlp --widths 8,8 --steps 100 >/dev/null 2>&1
for a in "" "--estimator is --preconditioner axes" "--estimator gaussian" \
         "--estimator mcmc --chains 4 --replicates 2"; do
  echo "== cutoff 0.01 $a"
  mf basin tiny --cutoff 0.01 --directions 4 --rollouts 0 --tag t --force $a 2>&1 | tail -3
  echo "exit $?"
done
rm -rf "$R"
