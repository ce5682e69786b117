#!/usr/bin/env bash
# NFE-budget runs (issue 16): local-error-unbiased with the coefficient chosen online to hit a
# target NFE, 3 seeds, two runs at a time. Resumable: finished runs are left alone.
#   benchmarks/budget.sh                      digits-node, budgets 44 and 62 (0.5x and 0.7x of
#                                             vanilla's final evaluation NFE, 88.7)
#   benchmarks/budget.sh mnist1d-node 41 58   mnist1d-node, 0.5x and 0.7x of vanilla's 82.2
# Results: benchmarks/results/budget/<experiment>/, tables <experiment>-budget<N>.md, plot
# <experiment>-lambda.png (lambda and training NFE per iteration).
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
for b in "$low" "$high"; do
    python -m regnde report "$out/$experiment/budget$b" --out "$out/$experiment-budget$b.md"
done
echo "budget runs took $((SECONDS - start)) s"
lambda=$out/lambda.png
[ "$experiment" = digits-node ] || lambda=$out/$experiment-lambda.png
python benchmarks/plot_budget.py "$out/$experiment" --out "$lambda"
