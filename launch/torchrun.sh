#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Train a recipe on one trn1 node with torchrun (one process per NeuronCore), or on one node of several.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<'EOF'
usage: launch/torchrun.sh [options] RECIPE [OVERRIDE...]

Runs `torchrun ... --module bmojo.cli.train experiment=RECIPE OVERRIDE...` with the Neuron runtime
environment of launch/env/neuron.env (and launch/env/efa.env across nodes). RECIPE names a preset of
recipes/experiment/, e.g. pretrain_370m_trn1; OVERRIDEs are Hydra overrides such as data.hub_name=...

options:
  --nproc N             processes on this node (default 32: the NeuronCores of a trn1.32xlarge)
  --nnodes N            nodes in the job (default 1)
  --node-rank R         this node's rank (default $SLURM_NODEID, else 0)
  --master-addr HOST    address of the rank-0 node (default localhost)
  --master-port PORT    its rendezvous port (default 41000)
  --run-dir DIR         run folder, shared by every rank (default runs/RECIPE)
  --precompile          trace the recipe's graphs under neuron_parallel_compile and compile them into
                        $NEURON_COMPILE_CACHE_URL (default runs/neuron-cache) instead of training
  --precompile-steps N  training steps the trial run traces (default 5; it starts with an evaluation)
  --dry-run             print the environment and the command instead of running them
  -h, --help            show this help
EOF
}

nproc=32
nnodes=1
node_rank="${SLURM_NODEID:-0}"
master_addr=localhost
master_port=41000
run_dir=""
precompile=0
precompile_steps=5
while [[ $# -gt 0 ]]; do
    case "$1" in
    --nproc) nproc="${2:-}" && shift ;;
    --nnodes) nnodes="${2:-}" && shift ;;
    --node-rank) node_rank="${2:-}" && shift ;;
    --master-addr) master_addr="${2:-}" && shift ;;
    --master-port) master_port="${2:-}" && shift ;;
    --run-dir) run_dir="${2:-}" && shift ;;
    --precompile) precompile=1 ;;
    --precompile-steps) precompile_steps="${2:-}" && shift ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage && exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
    esac
    shift
done
recipe="${1:-}"
check_recipe "$recipe"
shift
positive_integer --nproc "$nproc"
positive_integer --nnodes "$nnodes"
positive_integer --precompile-steps "$precompile_steps"
[[ "$node_rank" =~ ^[0-9]+$ && "$node_rank" -lt "$nnodes" ]] || die "--node-rank must be in [0, $nnodes), got '$node_rank'"
run_dir="${run_dir:-runs/$recipe}"
if ((precompile)); then
    run_dir="$run_dir.precompile" # the trial run writes no checkpoint; a folder of its own keeps it apart
fi

load_env "$LAUNCH_DIR/env/neuron.env"
if ((nnodes > 1)); then
    load_env "$LAUNCH_DIR/env/efa.env"
fi
export NEURON_COMPILE_CACHE_URL="${NEURON_COMPILE_CACHE_URL:-$REPO_ROOT/runs/neuron-cache}"
if ((DRY_RUN)); then
    echo "export $(quote "NEURON_COMPILE_CACHE_URL=$NEURON_COMPILE_CACHE_URL")"
fi

command=(
    torchrun --nproc_per_node "$nproc" --nnodes "$nnodes" --node_rank "$node_rank"
    --master_addr "$master_addr" --master_port "$master_port"
    --module bmojo.cli.train "experiment=$recipe" "hydra.run.dir=$run_dir" "$@"
)
if ((precompile)); then
    command=(neuron_parallel_compile "${command[@]}" "trainer.steps_this_run=$precompile_steps")
fi
launch "${command[@]}"
