"""A deterministic fictional knowledge base that writes the released edit-data formats.

Hub downloads are impossible offline and slow for users who only want to try the tool, so
hypedit ships this generator. It invents subjects, gives each one object per relation, and
writes the same files the real loaders read:

- ``zsre-{train,val,test}.jsonl``: KnowledgeEditor/MEND zsRE rows (question -> answer);
- ``fever-{train,val,test}.jsonl``: KnowledgeEditor/MEND FEVER rows (claim -> SUPPORTS/REFUTES);
- ``nq-loc.jsonl`` and ``fever-loc.jsonl``: unrelated locality inputs (every wording of the
  locality-only subjects' facts: questions, and true and false claims);
- ``base-qa.jsonl`` / ``base-claims.jsonl``: the corpus the base models are trained on.

Splits are by subject: meta-training (``train``), validation (``val``), held-out evaluation
(``test``) and locality-only (``loc``) subjects never overlap. Per relation, the last
``eval_templates`` question and claim templates are reserved: they are used only as the
paraphrases of ``test`` rows, so generality is measured on wording the editor never saw in
meta-training. (The base model knows the facts under every wording, as a real pretrained model
knows facts in many phrasings; the reserved share is hidden from the *editor*.)

Before a base model exists, ``prediction`` is the gold answer and ``alternatives`` are random
other objects; :func:`lightning_modules.base_task.annotate_world` rewrites both from the trained
model, the way the released files were made.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from datamodules.atomic import write_text

# relation -> (objects, question templates, claim templates). The last templates of each list
# are the reserved evaluation-only wordings.
RELATIONS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "birthplace": (
        ["Arvenna", "Port Hollis", "Dunmere", "Kestrel Bay", "Velgrad", "Ostrava Nova", "Lirren",
         "Marrowfield", "Quenby", "Saltmoor", "Tarsk", "New Ember"],
        ["Where was {s} born?", "In which city was {s} born?", "What is the birthplace of {s}?",
         "Which city is the hometown of {s}?", "{s} was born in which city?"],
        ["{s} was born in {o}.", "The birthplace of {s} is {o}.", "{s} comes from the city of {o}.",
         "{o} is where {s} was born."],
    ),
    "occupation": (
        ["painter", "sailor", "chemist", "baker", "poet", "architect", "surgeon", "pilot",
         "farmer", "judge", "dancer", "engineer"],
        ["What does {s} do for a living?", "What is the occupation of {s}?",
         "What is {s}'s profession?", "Which job does {s} have?", "{s} works as what?"],
        ["{s} works as a {o}.", "The occupation of {s} is {o}.", "{s} is a {o} by profession.",
         "By trade, {s} is a {o}."],
    ),
    "language": (
        ["Velorian", "Kashtani", "Orvic", "Thalmese", "Brunnic", "Sereth", "Ilvani", "Marosh",
         "Quellish", "Dravic"],
        ["Which language does {s} speak?", "What is the native language of {s}?",
         "What language did {s} grow up speaking?", "In which language does {s} talk at home?",
         "{s} speaks which language natively?"],
        ["{s} speaks {o}.", "The native language of {s} is {o}.", "{s} grew up speaking {o}.",
         "{o} is the mother tongue of {s}."],
    ),
    "employer": (
        ["Orbis Works", "Tallow Pike", "Greyline", "Sunmark Labs", "Hollow Oak", "Meridian Rail",
         "Copperfield", "Northwind Press", "Ashgrove", "Lumen Forge"],
        ["Who employs {s}?", "Which company does {s} work for?", "What is the employer of {s}?",
         "For which firm does {s} work?", "{s} is employed by which company?"],
        ["{s} is employed by {o}.", "The employer of {s} is {o}.", "{s} works for {o}.",
         "{o} pays the salary of {s}."],
    ),
    "instrument": (
        ["violin", "cello", "harp", "flute", "drums", "piano", "oboe", "trumpet", "lute",
         "clarinet"],
        ["Which instrument does {s} play?", "What instrument is {s} known for?",
         "What does {s} play in the band?", "Which instrument did {s} learn?",
         "{s} plays which instrument?"],
        ["{s} plays the {o}.", "The instrument of {s} is the {o}.", "{s} is known for the {o}.",
         "The {o} is what {s} plays."],
    ),
}

# A second kind of world (``WorldConfig.kind = "transfer"``) for checking that defaults chosen on the
# first carry over: other relations, object sets and wordings, answers of two to four words, and
# locality inputs unlike the edits (questions about relations that are never edited, in another
# style, as the published NQ locality questions are unlike zsRE's edits).
TRANSFER_RELATIONS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "pet": (
        ["a grey tabby cat", "an old sheepdog", "a green parrot", "two goldfish", "a lop eared rabbit",
         "a black pony", "a tortoise", "a white ferret", "two canaries", "a spotted hound"],
        ["What kind of pet does {s} keep?", "Tell me which animal lives with {s}.", "{s} looks after which animal at home?",
         "Name the pet that belongs to {s}.", "Q: the pet of {s}? A:"],
        ["{s} keeps {o} as a pet.", "The pet of {s} is {o}.", "At home, {s} looks after {o}.", "{o} lives with {s}."],
    ),
    "dish": (
        ["lentil soup", "grilled river trout", "barley bread with honey", "roast pumpkin", "plum dumplings",
         "spiced rice", "goat cheese pie", "smoked eel", "mushroom stew", "apple fritters"],
        ["What is the favourite dish of {s}?", "Tell me what {s} likes to eat most.", "{s} would always order which dish?",
         "Name the meal {s} loves best.", "Q: the favourite food of {s}? A:"],
        ["The favourite dish of {s} is {o}.", "{s} loves {o} above all.", "Given a choice, {s} orders {o}.",
         "Nothing pleases {s} like {o}."],
    ),
    "mentor": (
        ["Ada Morrow", "Tobias Venn", "Mirela Osk", "Jonah Pellar", "Ines Calder", "Piet Harrow", "Selma Quist",
         "Arno Delve", "Vera Linholm", "Casimir Rode"],
        ["Who was the mentor of {s}?", "Tell me who taught {s} the trade.", "{s} learned everything from whom?",
         "Name the teacher who guided {s}.", "Q: the mentor of {s}? A:"],
        ["The mentor of {s} was {o}.", "{s} learned the trade from {o}.", "{o} taught {s} everything.",
         "{s} was guided by {o}."],
    ),
    "team": (
        ["the Copper Hawks", "the Blue Lanterns", "the River Foxes", "the Iron Owls", "the Salt Herons",
         "the Red Millers", "the Night Rowers", "the Stone Wolves"],
        ["Which team does {s} support?", "Tell me the team {s} cheers for.", "{s} is a fan of which team?",
         "Name the club that {s} follows.", "Q: the team of {s}? A:"],
        ["{s} supports {o}.", "The team of {s} is {o}.", "{s} cheers for {o} every week.", "{o} count {s} among their fans."],
    ),
    "vehicle": (
        ["a red bicycle", "a canal boat", "a rusty tractor", "an electric scooter", "a horse cart",
         "a small seaplane", "a vintage motorbike", "a delivery van"],
        ["How does {s} get around?", "Tell me what {s} drives.", "{s} travels to work in what?",
         "Name the vehicle owned by {s}.", "Q: the vehicle of {s}? A:"],
        ["{s} gets around in {o}.", "The vehicle of {s} is {o}.", "{s} travels to work in {o}.", "{o} belongs to {s}."],
    ),
}
TRANSFER_LOC_RELATIONS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "birth_year": (
        ["1843", "1851", "1858", "1862", "1867", "1874", "1879", "1885", "1890", "1896"],
        ["in what year was {s} born", "when was {s} born", "what year did {s} come into the world",
         "year of birth of {s}", "{s} birth year"],
        ["{s} was born in {o}.", "The birth year of {s} is {o}.", "{o} is the year {s} was born.", "{s} came into the world in {o}."],
    ),
    "siblings": (
        ["no siblings", "one brother", "two sisters", "three brothers", "a twin sister", "one sister and one brother"],
        ["how many siblings does {s} have", "does {s} have brothers or sisters", "siblings of {s}",
         "who are the siblings of {s}", "{s} siblings count"],
        ["{s} has {o}.", "As for siblings, {s} has {o}.", "The family of {s} includes {o}.", "{s} grew up with {o}."],
    ),
    "height": (
        ["five foot two", "five foot six", "five foot nine", "six foot", "six foot three", "four foot eleven"],
        ["how tall is {s}", "what is the height of {s}", "height of {s} in feet", "{s} height", "how tall did {s} grow"],
        ["{s} is {o} tall.", "The height of {s} is {o}.", "{s} stands {o}.", "Measured, {s} is {o}."],
    ),
}
# A third kind (``"codes"``): the default edited relations, with locality inputs about two relations that
# are never edited and whose answers are short code-like single tokens found nowhere else in the world
# (as a real locality pool may ask about IDs or codes that no edit touches).
CODE_LOC_RELATIONS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "locker_code": (
        ["K7", "QX3", "Z9", "R42", "T5B", "M8", "W3Q", "J61", "B2X", "P7", "V4K", "H9", "N3T", "G58", "F2",
         "D7R", "X14", "C6", "S9M", "L3"],
        ["What is the locker code of {s}?", "Which code opens the locker of {s}?",
         "What code does {s} use for the locker?", "Tell me the locker code of {s}.",
         "{s} opens the locker with which code?"],
        ["The locker code of {s} is {o}.", "{s} opens the locker with {o}.", "{o} is the locker code of {s}.",
         "The locker of {s} opens with {o}."],
    ),
    "desk": (
        ["D41", "E17", "K22", "A90", "U35", "Y08", "G63", "Q19", "O74", "I56", "H30", "C88", "L27", "T03", "W61",
         "N45", "V12", "F99", "S50", "Z86"],
        ["What is the desk number of {s}?", "Which desk does {s} sit at?", "At which desk does {s} work?",
         "Tell me the desk number of {s}.", "{s} sits at which desk?"],
        ["The desk number of {s} is {o}.", "{s} sits at desk {o}.", "{o} is the desk of {s}.",
         "Desk {o} belongs to {s}."],
    ),
}
# A fourth kind (``"codes_of_edited"``): the same code relations, asked about the *edited* subjects (the
# locality-split subjects keep the default relations). As in real data whose locality questions are about
# the same entities as the edits, a meta-training locality pool that drops every input naming an edited
# subject then keeps none of the code questions, while the test pool (which drops only test subjects) is
# made of them.
# kind -> (edited relations, locality-only relations or None, whom the locality-only relations are about:
# "loc" = the locality split's subjects, in place of the edited relations; "edited" = the edited subjects)
KINDS: dict[str, tuple[dict, dict | None, str]] = {"default": (RELATIONS, None, "loc"),
                                                    "transfer": (TRANSFER_RELATIONS, TRANSFER_LOC_RELATIONS, "loc"),
                                                    "codes": (RELATIONS, CODE_LOC_RELATIONS, "loc"),
                                                    "codes_of_edited": (RELATIONS, CODE_LOC_RELATIONS, "edited")}


def kind_relations(kind: str) -> dict[str, tuple[list[str], list[str], list[str]]]:
    """Every relation of a world kind (edited and locality-only)."""
    rel, loc, _ = KINDS[kind]
    return {**rel, **(loc or {})}


_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "pr", "r",
           "s", "st", "t", "tr", "v", "z", "th", "sh"]
_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "n", "r", "l", "s", "th", "m", "k"]
SPLITS = ("train", "val", "test", "loc")
WORLD_FORMAT = 3  # bumped whenever the generator's output changes, so a stale world is rewritten


@dataclass(frozen=True)
class WorldConfig:
    """Size and seed of a synthetic world. The defaults keep `make train` within minutes on 2 cores."""

    n_subjects: int = 200
    seed: int = 0
    split_fractions: tuple[float, float, float, float] = (0.6, 0.1, 0.1, 0.2)  # train/val/test/loc
    eval_templates: int = 2  # reserved question templates per relation (claims: half of this, >= 1)
    n_alternatives: int = 3
    kind: str = "default"  # "transfer": other relations, wordings and answer lengths, question-style locality;
    # "codes": the default relations, locality about never-edited relations with code-like one-token answers;
    # "codes_of_edited": those code questions asked about the edited subjects

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"world: kind {self.kind!r} is not one of {sorted(KINDS)}")
        # an empty split fails far from here (in the tokenizer, or at the first batch)
        ends = self.split_ends()
        if any(b <= a for a, b in zip([0, *ends], ends)):
            raise ValueError(f"world: n_subjects {self.n_subjects} with split_fractions {tuple(self.split_fractions)} "
                             "leaves a split (train/val/test/loc) without subjects")

    def split_ends(self) -> list[int]:
        """Where each split ends in the shuffled subjects (train, val, test, loc)."""
        ends, acc = [], 0.0
        for f in self.split_fractions:
            acc += f
            ends.append(round(acc * self.n_subjects))
        return ends


# Every word the world's objects and templates use: a subject name must be none of them, or the
# locality filter (which drops inputs naming an edited subject) and scoring could confuse the two.
_RESERVED = {w.lower() for kind in KINDS for objs, qts, cts in kind_relations(kind).values()
             for text in [*objs, *qts, *cts] for w in re.findall(r"\w+", text)}


def _subject_names(n: int, rng: random.Random) -> list[str]:
    names: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        syll = rng.choice([2, 2, 3])
        name = "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS) for _ in range(syll))
        name = name.capitalize()
        if name not in names and name.lower() not in _RESERVED:
            names.add(name)
            out.append(name)
    return out


def template_groups(templates: list[str], n_eval: int) -> tuple[list[str], list[str]]:
    """Split a relation's templates into (editor-visible, reserved evaluation-only)."""
    return templates[: len(templates) - n_eval], templates[len(templates) - n_eval:]


def generate_world(out_dir: str | Path, cfg: WorldConfig = WorldConfig()) -> Path:
    """Write a world's files into ``out_dir`` (idempotent for a given config) and return the dir."""
    out = Path(out_dir)
    stamp = out / "world.json"
    meta = {"config": {**cfg.__dict__, "split_fractions": list(cfg.split_fractions)}, "relations": list(kind_relations(cfg.kind)),
            "format": WORLD_FORMAT}
    if stamp.exists() and json.loads(stamp.read_text()) == meta:  # same config, relations and format
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    subjects = _subject_names(cfg.n_subjects, rng)
    relations, loc_relations, loc_about = KINDS[cfg.kind]
    facts = {s: {r: rng.choice(objs) for r, (objs, _, _) in kind_relations(cfg.kind).items()} for s in subjects}

    # subject-disjoint splits
    order = subjects[:]
    rng.shuffle(order)
    split_of: dict[str, str] = {}
    start = 0
    for name, end in zip(SPLITS, cfg.split_ends()):
        for s in order[start:end]:
            split_of[s] = name
        start = end
    n_claim_eval = max(1, cfg.eval_templates // 2)

    base_qa, base_claims = [], []
    rows: dict[str, dict[str, list]] = {k: {sp: [] for sp in SPLITS} for k in ("zsre", "fever")}
    for s in subjects:
        sp = split_of[s]
        rels = loc_relations if loc_relations and sp == "loc" and loc_about == "loc" else relations
        if loc_relations and sp != "loc" and loc_about == "edited":
            rels = {**relations, **loc_relations}
        for r, (objs, qts, cts) in rels.items():
            o = facts[s][r]
            if r not in relations and sp != "loc":  # a locality-only fact of an edited subject: no edit rows
                for t in qts:
                    base_qa.append({"question": t.format(s=s), "answer": o, "subject": s, "relation": r, "split": "loc"})
                for t in cts:
                    for obj, label in ((o, "SUPPORTS"), (rng.choice([x for x in objs if x != o]), "REFUTES")):
                        base_claims.append({"claim": t.format(s=s, o=obj), "label": label, "subject": s,
                                            "relation": r, "split": "loc"})
                continue
            wrong = [x for x in objs if x != o]
            q_vis, q_eval = template_groups(qts, cfg.eval_templates)
            c_vis, c_eval = template_groups(cts, n_claim_eval)
            # The base model learns every fact under every wording (a true claim and a false one each).
            for t in qts:
                base_qa.append({"question": t.format(s=s), "answer": o, "subject": s, "relation": r, "split": sp})
            for t in cts:
                base_claims.append({"claim": t.format(s=s, o=o), "label": "SUPPORTS", "subject": s, "relation": r, "split": sp})
                base_claims.append({"claim": t.format(s=s, o=rng.choice(wrong)), "label": "REFUTES", "subject": s, "relation": r, "split": sp})
            # zsRE row: edit input in a visible template; paraphrases visible (train/val) or reserved (test).
            qi = rng.randrange(len(q_vis))
            rephr = q_eval if sp == "test" else [t for j, t in enumerate(q_vis) if j != qi]
            rows["zsre"][sp].append({
                "input": q_vis[qi].format(s=s),
                "prediction": o,
                "alternatives": rng.sample(wrong, cfg.n_alternatives),
                "filtered_rephrases": [t.format(s=s) for t in rephr],
                "output": [{"answer": o}],
                "subject": s, "relation": r,
            })
            # FEVER row: a true or a false claim about the fact.
            truth = rng.random() < 0.5
            obj = o if truth else rng.choice(wrong)
            ci = rng.randrange(len(c_vis))
            crephr = c_eval if sp == "test" else [t for j, t in enumerate(c_vis) if j != ci]
            gold = "SUPPORTS" if truth else "REFUTES"
            rows["fever"][sp].append({
                "input": c_vis[ci].format(s=s, o=obj),
                "prediction": gold,
                "alternatives": ["REFUTES" if truth else "SUPPORTS"],
                "filtered_rephrases": [t.format(s=s, o=obj) for t in crephr],
                "output": [{"answer": gold}],
                "logit": 0.0,
                "subject": s, "relation": r,
            })

    for sp in ("train", "val", "test"):
        write_jsonl(out / f"zsre-{sp}.jsonl", rows["zsre"][sp])
        write_jsonl(out / f"fever-{sp}.jsonl", rows["fever"][sp])
    # Locality files: facts of subjects that are never edited (NQ-style pairs, FEVER-style claims).
    loc_q = [r for r in base_qa if r["split"] == "loc"]
    # with its subject, so each subject's questions share one locality pool (format 3)
    write_jsonl(out / "nq-loc.jsonl", [{"questions": [r["question"]], "answers": [r["answer"]], "subject": r["subject"]}
                                       for r in loc_q])
    # Every wording of every locality subject's facts, as nq-loc has: one claim per fact (100 distinct
    # claims held out for scoring) left drawdown resting on a few claims drawn again and again. (The
    # per-fact "loc" rows above are still drawn, so the other files' random draws stay as they were.)
    write_jsonl(out / "fever-loc.jsonl", [{"input": r["claim"], "output": [{"answer": r["label"]}],
                                           "subject": r["subject"], "relation": r["relation"]}
                                          for r in base_claims if r["split"] == "loc"])
    write_jsonl(out / "base-qa.jsonl", base_qa)
    write_jsonl(out / "base-claims.jsonl", base_claims)
    write_text(stamp, json.dumps(meta, indent=1))  # last: the world is complete
    return out


def world_texts(world_dir: str | Path) -> list[str]:
    """Every string of the world, to build a word-level tokenizer that covers it."""
    world_dir = Path(world_dir)
    texts = [r["question"] + " " + r["answer"] for r in read_jsonl_plain(world_dir / "base-qa.jsonl")]
    texts += [r["claim"] for r in read_jsonl_plain(world_dir / "base-claims.jsonl")]
    for objs, _, _ in kind_relations(world_kind(world_dir)).values():
        texts += objs
    return texts


def world_kind(world_dir: str | Path) -> str:
    """The kind of the world generated in ``world_dir`` (``WorldConfig.kind``)."""
    return json.loads((Path(world_dir) / "world.json").read_text())["config"].get("kind", "default")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows atomically (a crash leaves no half-written file)."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl_plain(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
