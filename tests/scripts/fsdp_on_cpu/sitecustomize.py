"""Let accelerate run an FSDP config on the CPU, for tests only.

torch's FSDP2 (``fully_shard``) runs on the CPU over gloo, but accelerate routes an FSDP config to
FSDP only on accelerators: on the CPU it silently trains as DDP (``MULTI_CPU``). Put this
directory on ``PYTHONPATH`` of an ``accelerate launch`` and the state accelerate builds from the
FSDP config becomes FSDP, so the Trainer wraps, steps, checkpoints and saves through the same
code as on GPUs.
"""

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_accelerate_init = AcceleratorState.__init__


def _init_keeping_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerate_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


AcceleratorState.__init__ = _init_keeping_fsdp_on_cpu
