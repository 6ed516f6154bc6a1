"""``python -m accelerate.commands.launch --multi_gpu --num_processes 2 tests/_cpu_engines.py ENGINE RECIPE ...``:
harness.train under accelerate's FSDP2 (``fsdp2``) or DeepSpeed ZeRO (``zero1``, ``zero2``, ``zero3``)
on CPU processes (gloo); ``ddp`` leaves accelerate's DDP as it is.

With ``train.mixed_precision=fp16`` and ``HARNESS_TEST_FP16_SCALER`` set (JSON: the GradScaler's keyword
arguments), the run also gets accelerate's fp16 set-up of a GPU (native autocast and a GradScaler), on the
CPU, as ``_train_helpers.fp16_on_cpu`` gives an in-process run.

accelerate sets these up only on accelerators: on a CPU-only machine ``--use_fsdp`` quietly gives
unsharded processes. torch's FSDP2 and DeepSpeed's CPU accelerator both run on gloo, so this launcher
builds the Accelerator as usual and then switches its state to the engine with the plugin accelerate
would have built on GPUs. Everything after that (prepare, the engines' save_state/load_state,
get_state_dict) is accelerate's, torch's and DeepSpeed's own code, which is what the tests exercise
harness.train against.
"""

from __future__ import annotations

import json
import os
import sys

import accelerate
from _train_helpers import cpu_loss_scaling
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

ENGINE = sys.argv.pop(1)
_Accelerator = accelerate.Accelerator


def _set_type(kind: DistributedType) -> None:
    # accelerate keeps the type in both shared states; setting one leaves the other unsharded
    AcceleratorState._shared_state["distributed_type"] = kind
    PartialState._shared_state["distributed_type"] = kind


class OnCPU(_Accelerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        mp = self.mixed_precision
        if ENGINE == "fsdp2":
            plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                                    state_dict_type="SHARDED_STATE_DICT")
            if mp != "no":  # what accelerate's state does with the plugin it builds
                plugin.set_mixed_precision(mp)
            AcceleratorState._shared_state["fsdp_plugin"] = plugin
            _set_type(DistributedType.FSDP)
        elif ENGINE.startswith("zero"):
            # accelerate's own config writes gradient_accumulation_steps 1 and gradient_clipping 1.0
            plugin = DeepSpeedPlugin(zero_stage=int(ENGINE[4:]), gradient_accumulation_steps=1, gradient_clipping=1.0)
            plugin.set_mixed_precision(mp)
            plugin.select(_from_accelerator_state=True)
            AcceleratorState._shared_state["deepspeed_plugins"] = plugin
            _set_type(DistributedType.DEEPSPEED)
            self.deepspeed_engine_wrapped = None  # set by Accelerator.__init__ in DeepSpeed mode
        elif ENGINE != "ddp":
            raise SystemExit(f"_cpu_engines.py: unknown engine {ENGINE!r} (ddp, fsdp2, zero1, zero2, zero3)")
        scaler = os.environ.get("HARNESS_TEST_FP16_SCALER")
        if scaler is not None and mp == "fp16" and not ENGINE.startswith("zero"):
            # as accelerate sets up a GPU (FSDP2 too: a plain GradScaler, whose unscale of DTensor gradients
            # finds an overflow on any shard for every process)
            cpu_loss_scaling(self, **json.loads(scaler))


accelerate.Accelerator = OnCPU

if __name__ == "__main__":
    from harness.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
