"""Edit-pair DataModules: zsRE-style (question -> answer) and FEVER-style (claim -> verdict).

A batch holds ``batch_size`` independent edit *problems* of ``n_edits`` edits each (the edits of
one problem are applied together), as a dict of three padded sub-batches whose rows are grouped
by problem (see :mod:`datamodules.encoding`), plus ``n_problems``:

- ``edit_inner``: the edit inputs, labelled with their new targets;
- ``edit_outer``: one equivalent input (paraphrase) per edit, with the same new target;
- ``loc``: ``loc_per_edit`` unrelated inputs per edit, labelled with their known answers
  (-100 where unknown), drawn from a pool that shares no text with any edit; meta-training,
  validation and test draw from three disjoint pools, each input assigned by a hash of its subject
  (else its text) whatever splits are configured (``loc_shares``, :func:`assign_pools`).

Meta-training items are (edit, paraphrase) pairs, every paraphrase of every record once per
epoch (with ``redraw``, each item is drawn afresh every epoch: target, wording roles, locality
inputs); validation and test items are one per record with its first paraphrase (evaluation
scores all of them itself). Under DDP each process reads its own shard: in training the last
incomplete step is dropped so no edit is duplicated within a step; validation and test score
every edit exactly once, as one process does.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import lightning as L
import torch
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

    Items are dealt to the processes in blocks of ``block`` consecutive items (of this epoch's order):
    a block is one edit problem (``n_edits`` edits applied together, or one stream), so the problems
    of a global step under DDP are the ones one process with the whole global batch forms, not
    problems of interleaved edits. ``block`` 1 is :class:`DistributedSampler`'s ``rank, rank + world, ...``.

    ``even=False`` (evaluation) shards without padding: shards may differ by one block, every whole
    block is scored exactly once, and a ragged last block is kept or left out as one process's batches
    of ``batch_blocks`` problems (per process) would, so metrics under DDP equal one process's. Training keeps
    even shards (whole blocks), as DDP's gradient all-reduce needs equal step counts."""

    def __init__(self, *args: Any, even: bool = True, block: int = 1, batch_blocks: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not even and self.shuffle:
            raise ValueError("uneven (evaluation) shards are taken in order: shuffle must be False")
        self.even, self.block, self.batch_blocks = even, block, batch_blocks
        self.skip = 0  # leading items of this epoch's shard already consumed (set by ResumableLoader)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((i, self.epoch) for i in islice(self._shard(), self.skip, None))

    def __len__(self) -> int:
        return len(self._shard())

    def _shard(self) -> list[int]:
        n = len(self.dataset)
        if self.shuffle:  # DistributedSampler's order: the same permutation in every process
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        b, w = self.block, self.num_replicas
        if self.even:  # whole rounds of one block per process (training drops the rest)
            order = order[:n // (b * w) * b * w]
        elif n % b and n % (b * self.batch_blocks * w) >= b:
            # a ragged last problem: one process's collate drops it when the last (global) batch also holds
            # whole problems, and keeps it as a short problem when it is alone: the same choice here
            order = order[:n // b * b]
        blocks = [order[a:a + b] for a in range(0, len(order), b)]
        return [i for blk in blocks[self.rank::w] for i in blk]


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


SPLITS = ("train", "val", "test")


def _normalise(text: str) -> str:
    """Lower-case words joined by single spaces: "Where was Ada born?" and "where was ada born" are one text."""
    return " ".join(re.findall(r"\w+", text.lower()))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def loc_id(pair: LocalityPair) -> str:
    """A locality input's id: the SHA-256 (64 bits) of its normalised text, what editor files record."""
    return _sha256(_normalise(pair.prompt))[:16]


def assign_pools(pairs: list[LocalityPair], shares: tuple[float, float, float]) -> dict[str, list[LocalityPair]]:
    """Meta-training, validation and test locality pools (file order kept within each): an input goes to
    the pool where the SHA-256 of its group (its subject where the file names one, so a subject's
    inputs stay on one side; else its normalised text) falls in the hash range, cut by ``shares``.
    Independent of file order, of the other inputs and of which splits are configured."""
    if len(shares) != 3 or any(s <= 0 for s in shares):
        raise ValueError(f"loc_shares are three positive shares (train, val, test), got {list(shares)}")
    bounds = [sum(shares[: i + 1]) / sum(shares) for i in range(3)]
    pools: dict[str, list[LocalityPair]] = {n: [] for n in SPLITS}
    for p in pairs:
        u = int(_sha256(_normalise(p.subject or p.prompt))[:16], 16) / 16 ** 16
        pools[next((n for n, b in zip(SPLITS, bounds) if u < b), "test")].append(p)
    return pools


def _grouping(subjects: Iterable[str | None]) -> str:
    """How rows are grouped: by "subject" (every row names one), by "prompt" (none does) or "mixed"."""
    has = {bool(s) for s in subjects}
    return "mixed" if len(has) == 2 else "subject" if has == {True} else "prompt"


def _unrelated(pairs: list[LocalityPair], records: list[EditRecord]) -> list[LocalityPair]:
    """The locality inputs that repeat no text of ``records`` and name none of their subjects."""
    edit_text = {t for r in records for t in [r.prompt, *r.rephrases]}
    # Subjects are compared as word sequences, so multi-word ones ("Danielle Darrieux") match too.
    subjects = {" ".join(re.findall(r"\w+", r.subject)) for r in records if r.subject}
    subjects.discard("")
    return [p for p in pairs if p.prompt not in edit_text and not _mentions(p.prompt, subjects)]


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
    """Shared machinery; subclasses say how to read their files (:meth:`read_split`, :meth:`read_locality`).

    After :meth:`setup`: ``grouping`` says how edits and locality inputs were grouped ("subject",
    "prompt" where the files name no subject, as MEND's released zsRE, or "mixed"), ``rows_dropped``
    the rows each split's file lost (no alternative; no rephrase the base model answers alike), and
    :meth:`data_fingerprint` identifies the data served."""

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
        self.loc_pairs: list[LocalityPair] = []  # the locality inputs of the configured splits' pools, in file order
        # the disjoint pools of the splits present: meta-training's KL inputs ("train"), validation's
        # ("val": early stopping, checkpoint choice, drift probes) and test's ("test": eval.py)
        self.loc_split_pairs: dict[str, list[LocalityPair]] = {}
        self.loc_pools: dict[str, list[dict]] = {}
        self._train_share: list[tuple[LocalityPair, dict]] = []  # the meta-training pool before its subject filter
        self.grouping: dict[str, str] = {}
        self.rows_dropped: dict[str, dict[str, int]] = {}
        self._fingerprint: dict[str, Any] = {}

    @property
    def loc_train_pairs(self) -> list[LocalityPair]:
        return self.loc_split_pairs.get("train", [])

    @property
    def loc_train_encoded(self) -> list[dict]:
        return self.loc_pools.get("train", [])

    # -- format hooks
    def read_split(self, path: Path, skipped: dict[str, int]) -> tuple[list[EditRecord], list[LocalityPair]]:
        """A split file's records and embedded locality inputs; ``skipped`` receives the dropped rows' counts."""
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
            self.rows_dropped[name] = {}
            read[name], loc = self.read_split(Path(path), self.rows_dropped[name])
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
        self.grouping = {"edits": _grouping(r.subject for s in self.splits.values() for r in s.records),
                         "locality": _grouping(p.subject for p in pool)}
        try:  # every input, whichever pool it goes to: a file is refused whatever splits are configured
            encoded = encode(self.tokenizer, hp.family, [p.prompt for p in pool], [p.answer for p in pool],
                             hp.max_length)
        except TargetTooLong as e:
            raise DataFormatError(f"{hp.loc_path or 'the edit files (their locality inputs)'}: {e}") from None
        encoded_of = {id(p): e for p, e in zip(pool, encoded)}
        # Every input has its pool whatever splits are configured, so eval.py scores exactly the inputs
        # meta-training and validation never saw, even with other files or splits configured than theirs.
        pools = assign_pools(pool, hp.loc_shares)
        for name in self.splits:
            # Locality inputs must be unrelated: a pool loses those sharing text or subject with its own
            # split's edits (meta-training's: with any configured split's, so it sees no held-out subject),
            # so what a split scores depends on its own files only
            related = self.splits.values() if name == "train" else [self.splits[name]]
            pairs = _unrelated(pools[name], [r for s in related for r in s.records])
            if not pairs:
                raise ValueError(f"no {name} locality inputs: loc_shares {list(hp.loc_shares)} assign "
                                 f"{len(pools[name])} of the {len(pool)} locality inputs to the {name} pool, none "
                                 "of them unrelated to its edits; give a larger loc_path")
            self.loc_split_pairs[name], self.loc_pools[name] = pairs, [encoded_of[id(p)] for p in pairs]
        self._train_share = [(p, encoded_of[id(p)]) for p in pools["train"]]
        used = {id(p) for v in self.loc_split_pairs.values() for p in v}
        self.loc_pairs = [p for p in pool if id(p) in used]
        self._fingerprint = self._compute_fingerprint()
        log.info("%s data: %s edits, %d locality inputs (%s), grouped by %s", self.task,
                 {k: len(v.records) for k, v in self.splits.items()}, len(pool),
                 ", ".join(f"{len(v)} {k}" for k, v in self.loc_pools.items()), self.grouping)

    def memory_locality(self, split: str) -> list[dict]:
        """The meta-training share of the locality inputs, filtered as ``split``'s own pool is (against
        ``split``'s edits only): never scored when ``split`` is evaluated, for an editor that needs unscored
        inputs at evaluation time (Transformer-Patcher's memory). The meta-training pool proper drops every
        input naming any split's subject; where the locality questions are about the edited entities, that
        leaves it none of their kind, and a patch then fires on all of them."""
        keep = {id(p) for p in _unrelated([p for p, _ in self._train_share], self.splits[split].records)}
        return [e for p, e in self._train_share if id(p) in keep]

    def loc_ids(self, split: str) -> list[str]:
        """The ids (:func:`loc_id`) of ``split``'s locality pool."""
        return [loc_id(p) for p in self.loc_split_pairs[split]]

    def data_fingerprint(self) -> dict[str, Any]:
        """What this DataModule serves, as SHA-256 digests (every report carries it): each split's edit
        records as read (before eval.py samples them), each locality pool's inputs and answers, the
        pool shares, and one digest of it all. Equal fingerprints, equal data."""
        return self._fingerprint

    def data_record(self) -> dict[str, Any]:
        """What an editor file records of the data it was meta-trained on: :meth:`data_fingerprint` and
        the ids of the meta-training and validation locality pools (eval.py refuses a test pool that
        overlaps them: :func:`editors.io.check_pool_overlap`)."""
        return {**self.data_fingerprint(),
                "loc_ids": {s: self.loc_ids(s) for s in ("train", "val") if s in self.loc_split_pairs}}

    def _compute_fingerprint(self) -> dict[str, Any]:
        def digest(rows: Iterable[Any]) -> str:
            return _sha256(json.dumps(list(rows), ensure_ascii=False))

        fp: dict[str, Any] = {
            "edits": {k: {"n": len(v.records), "sha256": digest([r.prompt, r.target, r.rephrases, r.gold, r.prediction,
                                                                 r.subject] for r in v.records)}
                      for k, v in self.splits.items()},
            "loc_pools": {k: {"n": len(v), "sha256": digest(sorted([loc_id(p), p.answer or ""] for p in v))}
                          for k, v in self.loc_split_pairs.items()},
            "loc_shares": list(self.hparams.loc_shares)}
        return {**fp, "sha256": digest([fp])}

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
                               even=train, block=hp.n_edits, batch_blocks=hp.batch_size)
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

    def read_split(self, path: Path, skipped: dict[str, int]) -> tuple[list[EditRecord], list[LocalityPair]]:
        if path.suffix == ".json":
            return read_zsre_toolkit(path, skipped)
        return read_zsre_jsonl(path, skipped), []

    def read_locality(self, path: Path) -> list[LocalityPair]:
        return read_nq(path)


class FeverDataModule(EditDataModule):
    """FEVER-style claim edits (flip the verdict) from the KnowledgeEditor/MEND JSON lines; locality
    from other labelled claims in the same format."""

    task = "fever"

    def __init__(self, *args, family: Family = "classifier", **kwargs) -> None:
        super().__init__(*args, family=family, **kwargs)

    def read_split(self, path: Path, skipped: dict[str, int]) -> tuple[list[EditRecord], list[LocalityPair]]:
        return read_fever_jsonl(path, skipped), []

    def read_locality(self, path: Path) -> list[LocalityPair]:
        return read_fever_locality(path)
