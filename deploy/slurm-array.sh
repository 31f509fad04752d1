#!/usr/bin/env bash
# Runs one prefpipe pipeline on a Slurm cluster as N array tasks writing to
# one store, then the final step (DESIGN §13): the stages that need their
# whole input (sql, corpus-level selection, train, export) run once, in a
# job that starts only when every shard succeeded (--dependency=afterok).
#
#   STORE=s3://my-bucket/runs/uf-dpo deploy/slurm-array.sh pipelines/remote.yaml 8
#
# Environment (exported to the jobs with --export=ALL):
#   STORE               the run store every task shares: s3://bucket/prefix (or
#                       gs://, az://, or a directory on a shared filesystem)
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION (and AWS_ENDPOINT_URL,
#                       AWS_ALLOW_HTTP=true for MinIO/Ceph): object_store's
#                       standard variables; or PREFPIPE_CLOUD_METADATA=1 on
#                       nodes whose instance profile is the credential
#   PREFPIPE            the binary (default: prefpipe on PATH)
#   SHARD_SBATCH_ARGS   extra sbatch flags for each shard, e.g. "--gres=gpu:1 -t 4:00:00"
#   FINAL_SBATCH_ARGS   extra sbatch flags for the final step
#   PREFPIPE_LEASE_TTL_S  lease lifetime on object stores (default 60 s)
#
# A shard that fails or is preempted can be resubmitted alone
# (sbatch --array=I ...) or requeued: it resumes from its last finished chunk,
# taking over its own lease once the dead task's has expired. A changed
# pipeline never reuses another pipeline's chunks (they are keyed by content).
set -euo pipefail

usage="usage: STORE=s3://bucket/prefix $0 PIPELINE.yaml [N_SHARDS]"
PIPELINE=${1:?$usage}
N=${2:-8}
: "${STORE:?$usage}"
PREFPIPE=${PREFPIPE:-prefpipe}
[[ "$N" =~ ^[1-9][0-9]*$ ]] || { echo "N_SHARDS must be a positive integer, got '$N'" >&2; exit 2; }
[ -f "$PIPELINE" ] || { echo "no pipeline file $PIPELINE" >&2; exit 2; }
PIPELINE=$(cd "$(dirname "$PIPELINE")" && pwd)/$(basename "$PIPELINE")

# Fail here, not in N jobs: the pipeline and the store (credentials, bucket) must be usable.
"$PREFPIPE" validate "$PIPELINE" >/dev/null
"$PREFPIPE" plan "$PIPELINE" --store "$STORE" >/dev/null

export PIPELINE STORE N PREFPIPE
# shellcheck disable=SC2086  # the *_SBATCH_ARGS are lists of flags
shards=$(sbatch --parsable --job-name=prefpipe-shards --array="0-$((N - 1))" --requeue --export=ALL \
    ${SHARD_SBATCH_ARGS:-} \
    --wrap 'exec "$PREFPIPE" run "$PIPELINE" --store "$STORE" --shard "$SLURM_ARRAY_TASK_ID/$N" --log-format json')
shards=${shards%%;*}
# shellcheck disable=SC2086
final=$(sbatch --parsable --job-name=prefpipe-final --dependency="afterok:$shards" --kill-on-invalid-dep=yes --export=ALL \
    ${FINAL_SBATCH_ARGS:-} \
    --wrap 'exec "$PREFPIPE" run "$PIPELINE" --store "$STORE" --log-format json')
final=${final%%;*}
echo "shards: job $shards (array 0-$((N - 1))); final step: job $final (after every shard succeeded)"
echo "progress: $PREFPIPE plan $PIPELINE --store $STORE"
