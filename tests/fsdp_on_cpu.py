"""Run a script under FSDP on CPU processes: `accelerate launch --config_file configs/fsdp.yaml` with
ACCELERATE_USE_CPU=1, then `tests/fsdp_on_cpu.py train_dreambooth.py FLAGS...`.

torch's FSDP 2 runs on the CPU with gloo, but accelerate (1.x) selects FSDP only for an accelerator: on CPU processes
it keeps DistributedType.MULTI_CPU and prepares the models for DDP. This test helper makes accelerate's state say FSDP
when its FSDP plugin came from the configuration; everything after that (fully_shard of the transformer blocks,
accelerate's sharded save_state and load_state, the trainer's own FSDP path) is the code a GPU run takes."""

import runpy
import sys

import accelerate.state as state
from accelerate.utils import DistributedType

_accelerator_state_init = state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        self.fsdp_plugin = fsdp_plugin
        # AcceleratorState copies PartialState's fields at every construction: both must say FSDP.
        self.distributed_type = state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


if __name__ == "__main__":
    state.AcceleratorState.__init__ = _fsdp_on_cpu
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
