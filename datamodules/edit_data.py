"""Edit-pair DataModules: zsRE-style (question -> answer) and FEVER-style (claim -> verdict).

A batch holds ``batch_size`` independent edit *problems* of ``n_edits`` edits each (the edits of
one problem are applied together), as a dict of three padded sub-batches whose rows are grouped
by problem (see :mod:`datamodules.encoding`), plus ``n_problems``:

- ``edit_inner``: the edit inputs, labelled with their new targets;
- ``edit_outer``: one equivalent input (paraphrase) per edit, with the same new target;
- ``loc``: ``loc_per_edit`` unrelated inputs per edit, labelled with their known answers
  (-100 where unknown), drawn from a pool that shares no text with any edit; meta-training and
  meta-training, validation and test draw from three disjoint parts of it (``loc_shares``).

Meta-training items are (edit, paraphrase) pairs, every paraphrase of every record once per
epoch (with ``redraw``, each item is drawn afresh every epoch: target, wording roles, locality
inputs); validation and test items are one per record with its first paraphrase (evaluation
scores all of them itself). Under DDP each process reads its own shard: in training the last
incomplete step is dropped so no edit is duplicated within a step; validation and test score
every edit exactly once, as one process does.
"""
from __future__ import annotations

import hashlib
import logging
import random
import re
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import lightning as L
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.encoding import Family, TargetTooLong, collate, encode, load_tokenizer
from datamodules.formats import (DataFormatError, EditRecord, LocalityPair, read_fever_jsonl, read_fever_locality,
                                 read_nq, read_zsre_jsonl, read_zsre_toolkit)

log = logging.getLogger(__name__)


@dataclass
class EncodedSplit:
    """A split's records and their tokenised forms, ready to batch."""

    records: list[EditRecord]
    items: list[tuple[int, int]]  # (record index, paraphrase index)
    edits: list[dict]
    rephrases: list[list[dict]]


class EditDataset(Dataset):
    """Index -> (edit, paraphrase, locality inputs), deterministic for a given seed.

    With ``redraw`` (an encoding function), an index ``(i, epoch)`` from :class:`EpochSampler` draws
    item ``i`` afresh for every epoch: the edit's target among the record's alternatives, which of
    its wordings is the edit input and which the paraphrase, and its random locality inputs, so a few
    hundred training records give many distinct edits (default world, tiny GPT-2: test edit success
    0.99 with redraw, 0.94 without)."""

    def __init__(self, split: EncodedSplit, loc: list[dict], loc_per_edit: int, seed: int,
                 neighbours: list[list[int]] | None = None, n_hard: int = 0,
                 redraw: Callable[[list[str], list[str]], list[dict]] | None = None) -> None:
        self.split, self.loc, self.k, self.seed = split, loc, loc_per_edit, seed
        self.loc_order = list(range(len(loc)))
        random.Random(seed).shuffle(self.loc_order)
        self.neighbours, self.n_hard = neighbours, min(n_hard, loc_per_edit) if neighbours else 0
        self.redraw = redraw

    def __len__(self) -> int:
        return len(self.split.items)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i, epoch = key if isinstance(key, tuple) else (key, None)
        r, p = self.split.items[i]
        n_rand = self.k - self.n_hard
        if self.redraw is not None and epoch is not None:
            rng = random.Random(f"{self.seed}:{epoch}:{i}")  # string seeds hash the same in every process
            rec = self.split.records[r]
            wording, reph = rng.sample([rec.prompt, *rec.rephrases], 2)
            target = rng.choice(rec.extra.get("alternatives") or [rec.target])
            edit, rephrase = self.redraw([wording, reph], [target, target])
            locs = [self.loc[j] for j in rng.sample(range(len(self.loc)), min(n_rand, len(self.loc)))]
        else:
            edit, rephrase = self.split.edits[r], self.split.rephrases[r][p]
            locs = [self.loc[self.loc_order[(i * self.k + j) % len(self.loc)]] for j in range(n_rand)]
        if self.n_hard:  # hard negatives: unrelated inputs worded like this edit
            nb = self.neighbours[r]
            off = i * self.n_hard + (epoch or 0)
            locs += [self.loc[nb[(off + j) % len(nb)]] for j in range(self.n_hard)]
        return {"edit": edit, "rephrase": rephrase, "loc": locs, "index": i}


class EpochSampler(DistributedSampler):
    """A :class:`DistributedSampler` (one process or many) that yields ``(index, epoch)``, so the
    dataset can redraw items per epoch; Lightning calls ``set_epoch`` on it every epoch.

    ``even=False`` (evaluation) shards ``rank, rank + world, ...`` without padding or dropping:
    shards may differ by one item, and every item is scored exactly once, so metrics under DDP equal
    one process's. Training keeps even shards, as DDP's gradient all-reduce needs equal step counts."""

    def __init__(self, *args: Any, even: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not even and self.shuffle:
            raise ValueError("uneven (evaluation) shards are taken in order: shuffle must be False")
        self.even = even
        self.skip = 0  # leading items of this epoch's shard already consumed (set by ResumableLoader)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        own = super().__iter__() if self.even else self._uneven_shard()
        return ((i, self.epoch) for i in islice(own, self.skip, None))

    def __len__(self) -> int:
        return super().__len__() if self.even else len(self._uneven_shard())

    def _uneven_shard(self) -> range:
        return range(self.rank, len(self.dataset), self.num_replicas)


class ResumableLoader(DataLoader):
    """The training loader, resumable mid-epoch: Lightning saves its ``state_dict`` (the epoch and
    the batches of it already handed out) in every checkpoint and restores it on ``--ckpt_path``,
    and the restored epoch skips those batches. A killed run then sees, step for step, the data
    an unbroken run sees, instead of restarting the epoch's order (repeating its first batches
    and never reaching its last ones). The length stays the whole epoch, as Lightning counts the
    restored batches as done."""

    sampler: EpochSampler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0  # batches of the current epoch handed out
        self._restored: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        return self._epoch()

    def _epoch(self) -> Iterator[Any]:
        # a generator: this body runs at the first batch, after Lightning has set the sampler's epoch
        restored, self._restored = self._restored, None
        skip = restored["batches"] if restored and restored["epoch"] == self.sampler.epoch else 0
        self.sampler.skip, self._served = skip * self.batch_size, skip
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._restored = dict(state)


def _mentions(text: str, subjects: set[str]) -> bool:
    """Whether ``text`` contains one of ``subjects`` (space-joined word sequences) as whole words."""
    if not subjects:
        return False
    words = re.findall(r"\w+", text)
    longest = max(s.count(" ") + 1 for s in subjects)
    return any(" ".join(words[i:i + n]) in subjects
               for n in range(1, longest + 1) for i in range(len(words) - n + 1))


def split_points(n: int, shares: list[float]) -> list[int]:
    """Boundaries ``[0, ..., n]`` cutting ``n`` items into ``len(shares)`` non-empty contiguous parts."""
    if n < len(shares):
        raise ValueError(f"{n} locality inputs cannot be cut into {len(shares)} disjoint pools (one per split); "
                         "give a larger loc_path")
    if any(s <= 0 for s in shares):
        raise ValueError(f"loc_shares must be positive, got {shares}")
    total, acc, cuts = sum(shares), 0.0, [0]
    for i, s in enumerate(shares[:-1]):
        acc += s
        # at least one input for each part on both sides of every cut
        cuts.append(min(max(round(n * acc / total), cuts[-1] + 1), n - (len(shares) - 1 - i)))
    return cuts + [n]


def _same_file(a: str | None, b: str | None) -> bool:
    return bool(a and b) and Path(a).resolve() == Path(b).resolve()


def check_split_files(train: str | None, val: str | None, test: str | None, val_from_train: float) -> None:
    """Refuse configurations in which the splits are not disjoint by construction: validation (which
    selects checkpoints and stops training) or meta-training reading the test file."""
    if _same_file(val, test):
        raise ValueError(f"val_path and test_path are the same file ({test}): validation would select on test "
                         "edits. For releases with train/dev only, keep dev as test_path, set val_path to null and "
                         "carve validation out of training with val_from_train (e.g. 0.05)")
    if _same_file(train, test) or _same_file(train, val):
        raise ValueError(f"train_path {train} is also the val or test file: meta-training would see held-out edits")
    if val_from_train and val:
        raise ValueError("give either val_path or val_from_train, not both")
    if not 0 <= val_from_train < 1:
        raise ValueError(f"val_from_train is a share of the training subjects in [0, 1), got {val_from_train}")


def carve_by_subject(records: list[EditRecord], share: float) -> tuple[list[EditRecord], list[EditRecord]]:
    """Split training records into (train, validation) by subject: every record of a subject goes to the
    same side, so no validation fact is a meta-training fact. Rows without a subject (released MEND
    files) are grouped by their edit input. A subject goes to validation when the SHA-256 of its name
    falls in the lowest ``share`` of the hash range: deterministic, independent of file order and of
    the other subjects."""
    def val_side(rec: EditRecord) -> bool:
        key = (rec.subject or rec.prompt).strip().lower()
        return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) < share * 16 ** 8

    train = [r for r in records if not val_side(r)]
    val = [r for r in records if val_side(r)]
    if records and (not train or not val):
        raise ValueError(f"val_from_train={share} leaves {len(train)} training and {len(val)} validation edits "
                         f"of {len(records)}: use a larger training file or another share")
    return train, val


class EditDataModule(L.LightningDataModule):
    """Shared machinery; subclasses say how to read their files (:meth:`read_split`, :meth:`read_locality`)."""

    task = "edit"

    def __init__(self, train_path: str | None = None, val_path: str | None = None, test_path: str | None = None,
                 loc_path: str | None = None, tokenizer: str = "runs/base_zsre_gpt2_tiny/model",
                 family: Family = "causal", n_edits: int = 1, batch_size: int = 1, loc_per_edit: int = 1,
                 max_length: int = 64,
                 seed: int = 0, shuffle: bool = True, num_workers: int = 0, val_limit: int | None = None,
                 decoder_start_id: int | None = None, hard_loc: int = 0,
                 hard_loc_by: Literal["wording", "answer"] = "wording", redraw: bool = False,
                 loc_shares: tuple[float, float, float] = (0.5, 0.25, 0.25), val_from_train: float = 0.0,
                 val_loc_per_edit: int | None = None) -> None:
        super().__init__()
        if n_edits < 1 or batch_size < 1:  # refused now, not by the DataLoader once training starts
            raise ValueError(f"n_edits and batch_size must be at least 1, got {n_edits} and {batch_size}")
        self.save_hyperparameters()
        self.splits: dict[str, EncodedSplit] = {}
        self.eval_split = "test"
        self.loc_pairs: list[LocalityPair] = []  # the whole filtered pool
        # the pool cut into disjoint parts, one per split present: meta-training's KL inputs ("train"),
        # validation's ("val": early stopping, checkpoint choice, drift probes) and test's ("test": eval.py)
        self.loc_split_pairs: dict[str, list[LocalityPair]] = {}
        self.loc_pools: dict[str, list[dict]] = {}

    @property
    def loc_train_pairs(self) -> list[LocalityPair]:
        return self.loc_split_pairs.get("train", [])

    @property
    def loc_train_encoded(self) -> list[dict]:
        return self.loc_pools.get("train", [])

    # -- format hooks
    def read_split(self, path: Path) -> tuple[list[EditRecord], list[LocalityPair]]:
        raise NotImplementedError

    def read_locality(self, path: Path) -> list[LocalityPair]:
        raise NotImplementedError

    # -- setup
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.tokenizer)
        self.decoder_start_id = hp.decoder_start_id
        if hp.family == "seq2seq" and self.decoder_start_id is None:
            from transformers import AutoConfig

            self.decoder_start_id = AutoConfig.from_pretrained(hp.tokenizer).decoder_start_token_id
        check_split_files(hp.train_path, hp.val_path, hp.test_path, hp.val_from_train)
        read: dict[str, list[EditRecord]] = {}
        embedded_loc: list[LocalityPair] = []
        for name in ("train", "val", "test"):
            path = getattr(hp, f"{name}_path")
            if not path:
                continue
            read[name], loc = self.read_split(Path(path))
            embedded_loc += loc
        if hp.val_from_train:
            if "train" not in read:
                raise ValueError("val_from_train carves validation out of the training split: set train_path")
            read["train"], read["val"] = carve_by_subject(read["train"], hp.val_from_train)
            log.info("validation carved out of %s by subject (val_from_train=%g): %d training edits, %d validation "
                     "edits", hp.train_path, hp.val_from_train, len(read["train"]), len(read["val"]))
        for name in ("train", "val", "test"):
            if name not in read:
                continue
            recs = read[name][: hp.val_limit] if name == "val" and hp.val_limit else read[name]
            source = hp.train_path if name == "val" and hp.val_from_train else getattr(hp, f"{name}_path")
            try:
                self.splits[name] = self._encode_split(recs, expand=(name == "train"))
            except TargetTooLong as e:
                raise DataFormatError(f"{source}: {e}") from None
        pool = self.read_locality(Path(hp.loc_path)) if hp.loc_path else embedded_loc
        # Locality inputs must be unrelated: drop any that share text or subject with an edit.
        edit_text = {t for s in self.splits.values() for r in s.records for t in [r.prompt, *r.rephrases]}
        # Subjects are compared as word sequences, so multi-word ones ("Danielle Darrieux") match too.
        subjects = {" ".join(re.findall(r"\w+", r.subject)) for s in self.splits.values() for r in s.records if r.subject}
        subjects.discard("")
        pool = [p for p in pool if p.prompt not in edit_text and not _mentions(p.prompt, subjects)]
        if not pool:
            raise ValueError("no locality inputs left after removing those that overlap the edits; give loc_path")
        self.loc_pairs = pool
        try:
            encoded = encode(self.tokenizer, hp.family, [p.prompt for p in pool], [p.answer for p in pool],
                             hp.max_length)
        except TargetTooLong as e:
            raise DataFormatError(f"{hp.loc_path or 'the edit files (their locality inputs)'}: {e}") from None
        # One disjoint part of the pool per split present, by `loc_shares` (renormalised over those
        # splits), cut contiguously in file order: related inputs listed together (the built-in world
        # lists each subject's questions together) stay on one side. The same cut whatever the stage,
        # so eval.py scores exactly the inputs meta-training and validation never saw.
        present = [n for n in ("train", "val", "test") if n in self.splits]
        cuts = split_points(len(pool), [hp.loc_shares[("train", "val", "test").index(n)] for n in present])
        for n, (a, b) in zip(present, zip(cuts, cuts[1:])):
            self.loc_split_pairs[n], self.loc_pools[n] = pool[a:b], encoded[a:b]
        log.info("%s data: %s edits, %d locality inputs (%s)", self.task,
                 {k: len(v.records) for k, v in self.splits.items()}, len(pool),
                 ", ".join(f"{len(v)} {k}" for k, v in self.loc_pools.items()))

    def _encode_split(self, recs: list[EditRecord], expand: bool) -> EncodedSplit:
        hp = self.hparams
        edits = encode(self.tokenizer, hp.family, [r.prompt for r in recs], [r.target for r in recs], hp.max_length)
        flat = [(i, ph) for i, r in enumerate(recs) for ph in r.rephrases]
        enc = encode(self.tokenizer, hp.family, [ph for _, ph in flat], [recs[i].target for i, _ in flat], hp.max_length)
        reph: list[list[dict]] = [[] for _ in recs]
        for (i, _), e in zip(flat, enc):
            reph[i].append(e)
        if expand and hp.redraw:  # redraw edits towards the alternatives: they must fit too, checked now, not mid-run
            alts = [(r.prompt, a) for r in recs for a in r.extra.get("alternatives") or []]
            encode(self.tokenizer, hp.family, [p for p, _ in alts], [a for _, a in alts], hp.max_length)
        items = [(i, j) for i, r in enumerate(recs) for j in range(len(r.rephrases) if expand else 1)]
        return EncodedSplit(recs, items, edits, reph)

    # -- loaders
    def collate(self, items: list[dict]) -> dict:
        fam, pad = self.hparams.family, self.tokenizer.pad_token_id
        start = self.decoder_start_id
        n = self.hparams.n_edits
        items = items[: max(1, len(items) // n) * n]  # whole problems only (a ragged tail is dropped)
        return {"n_problems": max(1, len(items) // n), "edit_inner": collate([it["edit"] for it in items], pad, fam, start),
                "edit_outer": collate([it["rephrase"] for it in items], pad, fam, start),
                "loc": collate([l for it in items for l in it["loc"]], pad, fam, start),
                "index": [it["index"] for it in items]}

    def dataset(self, split: str) -> EditDataset:
        """A split's items. ``hard_loc`` of each meta-training edit's locality inputs are hard
        negatives, so the KL term teaches the editor to be specific to the subject: with
        ``hard_loc_by="wording"`` unrelated inputs worded most like the edit (other subjects asked
        the same way); with ``"answer"`` unrelated inputs whose answer is the edit's *current* one
        (other subjects with the same fact: "what does B do?" -> dancer, when the edit turns A from
        dancer into surgeon), the inputs a QA edit that learned "dancer -> surgeon" breaks.
        Validation and test keep randomly drawn locality inputs, so their figures stay comparable."""
        if split not in self.splits:
            raise ValueError(f"no {split} data: set {split}_path")
        hp = self.hparams
        nb = self._neighbours(self.splits[split]) if split == "train" and hp.hard_loc else None
        redraw = None
        if split == "train" and hp.redraw:
            redraw = partial(encode, self.tokenizer, hp.family, max_length=hp.max_length)
        loc = self.loc_pools[split]
        # validation may score more locality inputs per edit than meta-training needs: a fixed set of a
        # few per edit favours some validations over others by chance, which misleads early stopping
        k = hp.val_loc_per_edit if split == "val" and hp.val_loc_per_edit and self.eval_split != "val" else hp.loc_per_edit
        return EditDataset(self.splits[split], loc, k, hp.seed, nb, hp.hard_loc, redraw)

    def _neighbours(self, split: EncodedSplit, k: int = 8) -> list[list[int]]:
        """Per record, its hard-negative meta-training locality inputs (``hard_loc_by``): the ``k``
        sharing the most words with its prompt, or all whose answer is its current prediction
        (the wording ones where there are none)."""
        if not hasattr(self, "_nb_cache"):
            pool = self.loc_train_pairs
            words = [set(re.findall(r"\w+", p.prompt.lower())) for p in pool]
            same_answer: dict[str | None, list[int]] = {}
            for j, p in enumerate(pool):
                same_answer.setdefault(p.answer, []).append(j)
            self._nb_cache = []
            for r in split.records:
                if self.hparams.hard_loc_by == "answer" and r.prediction in same_answer:
                    self._nb_cache.append(same_answer[r.prediction])
                    continue
                w = set(re.findall(r"\w+", r.prompt.lower()))
                score = [len(w & lw) / max(1, len(w | lw)) for lw in words]
                self._nb_cache.append(sorted(range(len(words)), key=lambda j: -score[j])[:k])
        return self._nb_cache

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds, hp = self.dataset(split), self.hparams
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        # our own sampler, also for one process: the same seeded order whatever the number of processes;
        # training drops the ragged tail instead of padding it with duplicated edits, evaluation
        # scores every edit once on whichever process holds it
        train = split == "train"
        sampler = EpochSampler(ds, num_replicas=world, rank=rank, shuffle=shuffle, seed=hp.seed, drop_last=True,
                               even=train)
        return (ResumableLoader if train else DataLoader)(
            ds, batch_size=hp.n_edits * hp.batch_size, sampler=sampler, drop_last=train,
            num_workers=hp.num_workers, collate_fn=self.collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.hparams.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        """The loader ``trainer.test`` scores: the test split, or validation when evaluation is asked to
        make a design choice (``eval_split = "val"``, eval.py ``--split val``)."""
        return self._loader(self.eval_split, False)


class ZsreDataModule(EditDataModule):
    """zsRE-style QA edits from the KnowledgeEditor/MEND JSON lines (``.jsonl``) or the toolkit's
    JSON list (``.json``, which carries its own locality questions); locality from an NQ file."""

    task = "zsre"

    def read_split(self, path: Path) -> tuple[list[EditRecord], list[LocalityPair]]:
        if path.suffix == ".json":
            return read_zsre_toolkit(path)
        return read_zsre_jsonl(path), []

    def read_locality(self, path: Path) -> list[LocalityPair]:
        return read_nq(path)


class FeverDataModule(EditDataModule):
    """FEVER-style claim edits (flip the verdict) from the KnowledgeEditor/MEND JSON lines; locality
    from other labelled claims in the same format."""

    task = "fever"

    def __init__(self, *args, family: Family = "classifier", **kwargs) -> None:
        super().__init__(*args, family=family, **kwargs)

    def read_split(self, path: Path) -> tuple[list[EditRecord], list[LocalityPair]]:
        return read_fever_jsonl(path), []

    def read_locality(self, path: Path) -> list[LocalityPair]:
        return read_fever_locality(path)
