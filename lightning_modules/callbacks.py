"""Callbacks that watch what editing does to unrelated inputs while an editor trains."""
from __future__ import annotations

import lightning as L
import torch

from editors.losses import forward_logits, kl_pre_post


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


class LocalityDrift(L.Callback):
    """Every validation, apply a fixed set of validation edits one at a time and measure, on a fixed
    probe set of validation's own unrelated inputs, KL(unedited || edited) and the share of probes whose top-1
    prediction flips (at any answer position; label for classifiers). Logged as ``drift/kl`` and
    ``drift/top1_flip_rate`` (means over the probe edits), so drift is visible in TensorBoard as
    the editor trains, not only at the end."""

    def __init__(self, n_edits: int = 4, n_probes: int = 64) -> None:
        self.n_edits, self.n_probes = n_edits, n_probes
        self.edits: list[dict] = []
        self.probe: dict | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        ds = dm.dataset("val")
        self.edits = [dm.collate([ds[i]])["edit_inner"] for i in range(min(self.n_edits, len(ds)))]
        fam = pl_module.hparams.family
        from datamodules.encoding import collate

        self.probe = collate(dm.loc_pools["val"][: self.n_probes], dm.tokenizer.pad_token_id, fam, dm.decoder_start_id)

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.edits or trainer.sanity_checking:
            return
        fam, model, dev = pl_module.hparams.family, pl_module.model, pl_module.device
        probe = _to(self.probe, dev)
        pre = forward_logits(model, probe, fam)
        kls, flips = [], []
        for e in self.edits:
            edited = pl_module.editor.edit(model, _to(e, dev), fam)
            post = forward_logits(edited, probe, fam)
            kls.append(kl_pre_post(pre, post, probe, fam).mean())
            flips.append(_flipped(pre, post, probe, fam).float().mean())
        pl_module.log_dict({"drift/kl": torch.stack(kls).mean(), "drift/top1_flip_rate": torch.stack(flips).mean()},
                           rank_zero_only=True)


def _flipped(pre: torch.Tensor, post: torch.Tensor, batch: dict, family: str) -> torch.Tensor:
    if family == "classifier":
        return (pre > 0) != (post > 0)
    mask = batch["decoder_attention_mask" if family == "seq2seq" else "attention_mask"].bool()
    return ((pre.argmax(-1) != post.argmax(-1)) & mask).any(1)
