#!/usr/bin/env bash
# SLURM: 2 nodes x 8 GPUs, one task per GPU; Lightning reads the SLURM variables (ranks, master
# address) itself, so `srun` starts one 16-process job. Submit from the project root:
#   sbatch recipes/slurm.sh recipes/llama-7b.yaml
#SBATCH --job-name=llmp-fit
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
recipe=${1:-recipes/llama-7b.yaml}
# 4 per GPU x 16 GPUs = 64: the paper's batch, no accumulation.
srun python recipes/launch.py --config "$recipe" --config recipes/strategies/zero2.yaml \
  --trainer.num_nodes "$SLURM_JOB_NUM_NODES" --trainer.devices "$SLURM_NTASKS_PER_NODE" \
  --trainer.accumulate_grad_batches 1
