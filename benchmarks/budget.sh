#!/usr/bin/env bash
# NFE-budget runs on digits-node (issue 16): budgets 0.5x and 0.7x of vanilla's final
# evaluation NFE (88.7, BENCHMARKS.md), 3 seeds, local-error-unbiased, two runs at a time.
# Resumable: finished runs are left alone. Results: benchmarks/results/budget/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/budget
run() {  # budget seed
    regnde run digits-node --regularizer local-error-unbiased --nfe-budget "$1" --seed "$2" \
        --threads 1 --no-progress --out "$out/digits-node/budget$1/seed$2" > /dev/null
}
start=$SECONDS
for seed in 0 1 2; do
    run 44 "$seed" & run 62 "$seed" & wait
done
for b in 44 62; do regnde report "$out/digits-node/budget$b" --out "$out/digits-node-budget$b.md"; done
echo "budget runs took $((SECONDS - start)) s"
python benchmarks/plot_budget.py
