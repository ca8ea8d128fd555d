"""Meta-training with the frozen base sharded across processes and the editor replicated.

:class:`ShardedBaseStrategy` is Lightning's DDP with one change: before the module goes to its
device, the base model (``module.model``) is sharded with FSDP2 (``fully_shard``: one unit per
transformer block, one for the rest), so each process holds ``1/N`` of the base at rest and
gathers one block at a time in forward and backward. The modules of the edited matrices are left
out of the shards, whole on every process: the gradient-piece hooks and the edit terms act on
their inputs and outputs exactly as without sharding, and they are a small part of a large base
(docs/real_models.md). The editor stays under DDP (gradients all-reduced; manual optimisation
all-reduces its own), so a run equals DDP's on the same global batch::

    python train.py --config configs/mend_zsre_llama_sharded.yaml --trainer.devices 8
"""
from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from editors.layers import LayerSpec


def shard_base(model: nn.Module, keep: list[LayerSpec], mesh: DeviceMesh) -> None:
    """Shard ``model``'s parameters over ``mesh`` (FSDP2), one unit per transformer block (the classes
    transformers names in ``_no_split_modules``) and one for the rest, except those of the modules of
    ``keep``, which stay whole."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    if not blocks:
        raise ValueError(f"cannot shard {type(model).__name__}: it names no transformer block class "
                         "(_no_split_modules)")
    whole = {p for spec in keep for p in model.get_submodule(spec.module_name).parameters()}
    # innermost first: each unit manages the parameters no unit inside it already does
    for mod in reversed([m for m in model.modules() if type(m).__name__ in blocks]):
        fully_shard(mod, mesh=mesh, ignored_params=whole)
    fully_shard(model, mesh=mesh, ignored_params=whole)


def local_bytes(model: nn.Module) -> tuple[int, int]:
    """Bytes of ``model``'s parameters this process holds: all, and those not sharded."""
    total = whole = 0
    for p in model.parameters():
        n = (p.to_local() if isinstance(p, DTensor) else p).nbytes
        total += n
        whole += 0 if isinstance(p, DTensor) else n
    return total, whole


class ShardedBaseStrategy(DDPStrategy):
    """DDP for the editor, FSDP2 for the frozen base (see the module docstring); for an
    :class:`lightning_modules.editor_module.EditorModule`."""

    _extra = 0  # repeats of this process's last validation batch (see on_validation_start)

    def setup(self, trainer: L.Trainer) -> None:
        module = self.lightning_module
        if getattr(module, "rule_scales", None):  # MENDModule's until_right_scales
            raise MisconfigurationException("until_right_scales stops each process's search at its own edits, so the "
                                            "processes would run different numbers of passes: not with a sharded base")
        if not isinstance(module.model, FSDPModule):  # not yet sharded by an earlier fit or validate of it
            shard_base(module.model, module.editor.layers, init_device_mesh(self.root_device.type, (self.world_size,)))
            total, whole = local_bytes(module.model)
            if self.global_rank == 0:
                print(f"[hypedit] base sharded over {self.world_size} processes: {total / 2**20:,.2f} MiB of "
                      f"parameters per process, {whole / 2**20:,.2f} MiB of them the edited modules, whole")
        # the base is loaded alike everywhere and never trains: DDP neither broadcasts nor reduces it
        module._ddp_params_and_buffers_to_ignore = [
            f"model.{n}" for n, _ in [*module.model.named_parameters(), *module.model.named_buffers()]]
        super().setup(trainer)

    def on_validation_start(self) -> None:
        # every pass of a sharded base is a collective, and evaluation shards may differ by a batch (each
        # edit is scored once): a process with fewer batches repeats its last one, uncounted, as often
        trainer = self.lightning_module.trainer
        own = sum(trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches)
        most = torch.tensor(own, device=self.root_device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        self._last, self._extra = own - 1, int(most) - own

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        out = super().validation_step(*args, **kwargs)
        if self._extra and args[1] == self._last:
            module = self.lightning_module
            kept = copy.deepcopy(module.val)  # the metrics as the real batches left them
            for _ in range(self._extra):
                super().validation_step(*args, **kwargs)
            module.val = kept
        return out
