"""Recipe launcher for `fabric run` (torchrun) and SLURM's `srun`: the same as `llmp fit`.

    fabric run --accelerator cpu --devices 2 --strategy ddp recipes/launch.py --config recipes/X.yaml
    srun python recipes/launch.py --config recipes/X.yaml --trainer.num_nodes 2 --trainer.devices 8

`fabric run` sets LT_ACCELERATOR / LT_DEVICES / LT_STRATEGY / LT_PRECISION / LT_NUM_NODES, which a
Trainer ignores; `llmp fit` maps them onto the Trainer, so the N processes form one N-process job.
"""

import sys

from llmp.fit import main

if __name__ == "__main__":
    sys.exit(main())
