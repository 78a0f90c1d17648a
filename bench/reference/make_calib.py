"""Write llmp's calibration ids for a model folder, so LLM-Pruner sees the same tokens.

Run with llmp's venv:  python bench/reference/make_calib.py MODEL_DIR OUT.pt [--n 10 --len 64]

Uses exactly what bench/prune.py does: load_model(MODEL_DIR)'s tokenizer and
calibration_samples("c4", tokenizer, n, len, PruneConfig().seed).
"""

import argparse

import torch

from llmp import PruneConfig, load_model
from llmp.data import calibration_samples

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("out")
p.add_argument("--source", default="c4")
p.add_argument("--n", type=int, default=10)
p.add_argument("--len", type=int, default=64)
a = p.parse_args()
_, tok = load_model(a.model)
seed = PruneConfig().seed
ids = calibration_samples(a.source, tok, a.n, a.len, seed)
torch.save(ids, a.out)
print(
    f"{a.out}: shape {tuple(ids.shape)} dtype {ids.dtype} seed {seed} max id {int(ids.max())} first {ids[0, :8].tolist()}"
)
