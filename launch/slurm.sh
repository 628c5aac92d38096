#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
#SBATCH --job-name=bmojo
#SBATCH --exclusive
#SBATCH --ntasks-per-node=1
#SBATCH --output=slurm-%x-%j.out
# Train a recipe on several trn1 nodes under SLURM: srun starts launch/torchrun.sh once per node, and each
# runs 32 processes. Submit from the checkout: sbatch --nodes 4 launch/slurm.sh pretrain_370m_trn1 ...
set -euo pipefail
launch_dir="$(dirname "${BASH_SOURCE[0]}")"
if [[ ! -f "$launch_dir/common.sh" ]]; then
    launch_dir="${SLURM_SUBMIT_DIR:-.}/launch" # sbatch runs a copy of this script from its spool folder
fi
# shellcheck source=common.sh
source "$launch_dir/common.sh"

usage() {
    cat <<'EOF'
usage: sbatch --nodes N launch/slurm.sh [options] RECIPE [OVERRIDE...]
       launch/slurm.sh --dry-run [--nodes N --master-addr HOST] RECIPE [OVERRIDE...]

Inside the allocation: `srun` one task per node, each `launch/torchrun.sh --nnodes N --node-rank
$SLURM_NODEID --master-addr <first node> RECIPE OVERRIDE...`. With the EFA settings of launch/env/efa.env.

options:
  --nodes N             nodes (default $SLURM_JOB_NUM_NODES)
  --master-addr HOST    rank-0 node (default the first of $SLURM_JOB_NODELIST)
  --master-port PORT    its rendezvous port (default 41000)
  --run-dir DIR         run folder on storage every node sees (default runs/RECIPE)
  --precompile          compile the graphs with neuron_parallel_compile on every node instead of training
  --precompile-steps N  training steps the trial run traces (default 5)
  --dry-run             print the srun command and what node 0 runs, without running them
  -h, --help            show this help
EOF
}

nodes="${SLURM_JOB_NUM_NODES:-}"
master_addr=""
node_options=()
while [[ $# -gt 0 ]]; do
    case "$1" in
    --nodes) nodes="${2:-}" && shift ;;
    --master-addr) master_addr="${2:-}" && shift ;;
    --master-port | --run-dir | --precompile-steps) node_options+=("$1" "${2:-}") && shift ;;
    --precompile) node_options+=("$1") ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage && exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
    esac
    shift
done
check_recipe "${1:-}"
[[ -n "$nodes" ]] || die "no node count: submit with sbatch --nodes N, or pass --nodes N for a dry run"
positive_integer --nodes "$nodes"
if [[ -z "$master_addr" ]]; then
    [[ -n "${SLURM_JOB_NODELIST:-}" ]] || die "no node list: run inside a SLURM allocation, or pass --master-addr HOST"
    master_addr="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
fi

node_command=("$LAUNCH_DIR/torchrun.sh" --nnodes "$nodes" --master-addr "$master_addr" "${node_options[@]}")
if ((DRY_RUN)); then
    echo "# srun starts this on every node, where SLURM_NODEID (0..$((nodes - 1))) is its rank; node 0 runs:"
    SLURM_NODEID=0 "${node_command[@]}" --dry-run "$@" | sed 's/^/#   /'
fi
launch srun --nodes="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 "${node_command[@]}" "$@"
