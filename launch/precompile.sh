#!/usr/bin/env bash
# Compile a recipe's graphs ahead of training on one trn1 node: neuron_parallel_compile runs a short trial
# of the training (whose values are all zeros, so it writes no checkpoint), extracts every graph and
# compiles them in parallel into the persistent cache that the real run then reads. Takes the options of
# launch/torchrun.sh (--precompile-steps N sets the trial's length); across nodes use
# `sbatch --nodes N launch/slurm.sh --precompile RECIPE ...`, since graphs depend on the number of ranks.
#   launch/precompile.sh [--dry-run] pretrain_370m_trn1 data.hub_name=...
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh" --precompile "$@"
