"""``python -m accelerate.commands.launch --multi_gpu --num_processes 2 tests/_fsdp_cpu.py RECIPE ...``:
harness.train under accelerate's FSDP2 on CPU processes (gloo).

accelerate only shards on accelerators: on a CPU-only machine ``--use_fsdp`` quietly gives unsharded
processes. torch's FSDP2 itself runs on CPU with gloo, so this launcher builds the Accelerator as
usual and then switches its state to FSDP2 with a default plugin, the state accelerate would have
built on GPUs. Everything after that (prepare, sharded save_state/load_state, get_state_dict) is
accelerate's own FSDP2 code, which is what the test exercises harness.train against.
"""

from __future__ import annotations

import sys

import accelerate
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_Accelerator = accelerate.Accelerator


class FSDP2OnCPU(_Accelerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                                state_dict_type="SHARDED_STATE_DICT")
        if self.mixed_precision != "no":  # what accelerate's state does with the plugin it builds
            plugin.set_mixed_precision(self.mixed_precision)
        AcceleratorState._shared_state["fsdp_plugin"] = plugin
        # accelerate keeps the type in both shared states; setting one leaves the other unsharded
        AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


accelerate.Accelerator = FSDP2OnCPU

if __name__ == "__main__":
    from harness.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
