# shellcheck shell=bash
# Shared by the launchers in launch/ (sourced, not run): finding the checkout, checking the recipe name,
# loading the environment files, and running a command or, with --dry-run, only printing it.

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$LAUNCH_DIR")"
DRY_RUN=0

die() {
    echo "${0##*/}: error: $*" >&2
    exit 2
}

# check_recipe NAME: NAME must be a preset of recipes/experiment/.
check_recipe() {
    local name="$1" path available=()
    [[ -n "$name" ]] || die "name a recipe, e.g. pretrain_370m_trn1 (see --help)"
    if [[ ! -f "$REPO_ROOT/recipes/experiment/$name.yaml" ]]; then
        for path in "$REPO_ROOT"/recipes/experiment/[!_]*.yaml; do
            path="${path##*/}"
            available+=("${path%.yaml}")
        done
        die "no recipe '$name' in recipes/experiment/; choose one of: ${available[*]}"
    fi
}

# positive_integer NAME VALUE: VALUE must be a whole number of at least 1.
positive_integer() {
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a whole number of at least 1, got '$2'"
}

# quote ARG...: the arguments as one shell-ready line.
quote() {
    local arg line=""
    for arg in "$@"; do
        if [[ "$arg" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
            line+="$arg "
        else
            line+="'${arg//\'/\'\\\'\'}' "
        fi
    done
    echo "${line% }"
}

# load_env FILE: export each NAME=value line of FILE unless NAME is already set; print it in a dry run.
load_env() {
    local name value
    while IFS= read -r line || [[ -n "$line" ]]; do
        [[ "$line" =~ ^[A-Z_][A-Z0-9_]*= ]] || continue
        name="${line%%=*}"
        value="${line#*=}"
        if [[ -z "${!name+set}" ]]; then
            export "$name=$value"
        fi
        if ((DRY_RUN)); then
            echo "export $(quote "$name=${!name}")"
        fi
    done <"$1"
}

# launch COMMAND...: print the command, then run it in place of this script unless this is a dry run.
launch() {
    if ((DRY_RUN)); then
        quote "$@"
        return 0
    fi
    echo "+ $(quote "$@")" >&2
    cd "$REPO_ROOT" || die "cannot enter $REPO_ROOT"
    exec "$@"
}
