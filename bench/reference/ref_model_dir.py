"""Make a transformers-4.x-readable view of a model folder written by transformers 5.

    python bench/reference/ref_model_dir.py SRC_DIR DST_DIR

The weights (model.safetensors*), tokenizer.json and generation_config.json are symlinked;
SRC_DIR is never modified. Only two small files are rewritten:
  config.json: transformers 5 writes `rope_parameters` {rope_theta, rope_type} and `dtype`;
    4.x reads the top-level `rope_theta` / `torch_dtype` (it would silently use rope_theta=10000).
  tokenizer_config.json: `tokenizer_class: TokenizersBackend` (a 5.x class) ->
    PreTrainedTokenizerFast (same tokenizer.json).
Needs only the standard library.
"""

import json
import os
import sys
from pathlib import Path

src, dst = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for f in src.iterdir():
    if f.name in ("config.json", "tokenizer_config.json"):
        continue
    link = dst / f.name
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(f, link)

cfg = json.loads((src / "config.json").read_text())
rope = cfg.pop("rope_parameters", None) or {}
if "rope_theta" in rope:
    cfg["rope_theta"] = rope["rope_theta"]
if rope.get("rope_type", "default") != "default":
    cfg["rope_scaling"] = rope  # not needed for the models here
if "dtype" in cfg:
    cfg["torch_dtype"] = cfg.pop("dtype")
(dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

tok = json.loads((src / "tokenizer_config.json").read_text())
if tok.get("tokenizer_class") == "TokenizersBackend":
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
for k in ("backend", "is_local", "local_files_only"):
    tok.pop(k, None)
(dst / "tokenizer_config.json").write_text(json.dumps(tok, indent=2) + "\n")
print(f"{dst}: rope_theta={cfg.get('rope_theta')} torch_dtype={cfg.get('torch_dtype')}")
