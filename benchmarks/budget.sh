#!/usr/bin/env bash
# NFE-budget runs (issue 16): local-error-unbiased with the coefficient chosen online to hit a
# target NFE, 3 seeds, two runs at a time. Resumable: finished runs are left alone.
#   benchmarks/budget.sh                      digits-node, budgets 44 and 62 (0.5x and 0.7x of
#                                             vanilla's final evaluation NFE, 88.7)
#   benchmarks/budget.sh mnist1d-node 41 58   mnist1d-node, 0.5x and 0.7x of vanilla's 82.2
# Results: benchmarks/results/budget/<experiment>/; `regnde report` writes the table
# <experiment>.md and the plot <experiment>-budget.png (lambda and training NFE per iteration).
set -euo pipefail
cd "$(dirname "$0")/.."
experiment=${1:-digits-node}
low=${2:-44}
high=${3:-62}
out=benchmarks/results/budget
run() {  # budget seed
    python -m regnde run "$experiment" --regularizer local-error-unbiased --nfe-budget "$1" \
        --seed "$2" --threads 1 --no-progress --out "$out/$experiment/budget$1/seed$2" > /dev/null
}
start=$SECONDS
for seed in 0 1 2; do
    run "$low" "$seed" & run "$high" "$seed" & wait
done
echo "budget runs took $((SECONDS - start)) s"
vanilla=benchmarks/results/experiments/$experiment/none  # the NFE ratio's reference, if run
[ -d "$vanilla" ] || vanilla=
python -m regnde report "$out/$experiment" $vanilla --out "$out/$experiment.md"
