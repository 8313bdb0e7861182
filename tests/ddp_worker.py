"""Run by test_parallel.py under torchrun: pretrain, then dump this rank's weights and losses."""

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from nanoseek.cli import build_parser
from nanoseek.pretrain import train

out = Path(sys.argv[1])
args = build_parser().parse_args(["pretrain", *sys.argv[2:]])
model, summary = train(args)
rank = int(os.environ.get("RANK", "0"))
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
(out / f"summary{rank}.json").write_text(json.dumps({k: summary[k] for k in ("val_loss", "val_bpb", "step")}))
