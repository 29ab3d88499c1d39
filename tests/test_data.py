"""Prompt datasets and tokenizers: schema errors with file and line, the skip threshold, Parquet, chat
templates, BOS handling, sentencepiece, the toy task's files."""

from __future__ import annotations

import io
import json
import logging
import random

import pytest

from gift_megatron.data import DatasetError, PromptExample, Tokenizer, check_vocab, load_prompts


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


GOOD = {"prompt": "2+2=", "answer": "4", "expert": "4", "teachers": ["4", "5"]}


# ------------------------------------------------------------------------------------------ schema
def test_rows_fields_and_renames(tmp_path):
    f = write_jsonl(
        tmp_path / "a.jsonl",
        [
            GOOD,
            {"question": "q?", "answer": 7, "extra": [1]},
            {
                "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                "answer": "x",
                "id": 3,
            },
        ],
    )
    rows, report = load_prompts(f, fields={"prompt": "question"}, max_skipped_fraction=0.5)
    # With the rename, row 1 lacks 'question': skipped and reported, not silently dropped.
    assert report.rows == 3 and report.used == 2
    assert [(s[1], s[2]) for s in report.skipped] == [(1, "needs 'question' or 'messages'")]
    assert rows[0] == PromptExample(prompt="q?", messages=None, answer="7", source=f, line=2)  # extra column ignored
    assert rows[1].messages == (("system", "be brief"), ("user", "hi")) and rows[1].prompt_text == "hi"
    assert rows[1].chat == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert rows[1].id == "3" and rows[1].where == f"{f}:3"
    assert rows[0].chat == [{"role": "user", "content": "q?"}]
    with pytest.raises(Exception):  # frozen: rows cannot be changed after loading
        rows[0].answer = "8"
    full, _ = load_prompts(f, max_skipped_fraction=0.5)
    assert (full[0].expert, full[0].teachers) == ("4", ("4", "5"))


@pytest.mark.parametrize(
    "row, reason",
    [
        ('{"prompt": "x", ', "invalid JSON"),
        ({"answer": "1"}, "needs 'prompt' or 'messages'"),
        ({"prompt": 3}, "field 'prompt' must be a string, got int"),
        ({"prompt": "  "}, "empty 'prompt'"),
        ({"prompt": "p", "answer": True}, "field 'answer' must be a string, got bool"),
        ({"prompt": "p", "answer": float("nan")}, "field 'answer' is nan"),
        ({"prompt": "p", "expert": ["a"]}, "field 'expert' must be a string"),
        ({"prompt": "p", "teachers": "t"}, "field 'teachers' must be a list of strings"),
        ({"prompt": "p", "teachers": ["a", 1]}, "field 'teachers' must be a list of strings"),
        ({"messages": [{"role": "user"}]}, "messages[0] must be"),
        ({"messages": []}, "field 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user", "content": " "}]}, "field 'messages': every message is empty"),
        ([1, 2], "expected an object, got list"),
    ],
)
def test_malformed_rows_name_file_line_and_reason(tmp_path, row, reason):
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, row])
    with pytest.raises(DatasetError) as err:
        load_prompts(f)
    assert f"{f}:3: {reason}" in str(err.value) and "1 of 3 rows are malformed" in str(err.value)


def test_bad_encoding_is_one_bad_row(tmp_path):
    f = tmp_path / "enc.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n{"prompt": "\xff"}\n\n{"prompt": "b"}\n')  # BOM, bad byte, blank
    rows, report = load_prompts(str(f), max_skipped_fraction=0.5)
    assert [r.prompt for r in rows] == ["a", "b"] and [r.line for r in rows] == [1, 4]
    assert report.rows == 3 and report.skipped[0][1] == 2 and "not UTF-8" in report.skipped[0][2]


def test_threshold_allows_and_logs_skips(tmp_path, caplog):
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 9 + [{"answer": "1"}])
    with caplog.at_level(logging.WARNING, logger="gift_megatron.data"):
        rows, report = load_prompts(f, max_skipped_fraction=0.1)
    assert len(rows) == 9 and len(report.skipped) == 1
    assert "skipped 1 of 10 malformed rows" in caplog.text and f"{f}:10: needs 'prompt'" in caplog.text
    with pytest.raises(DatasetError, match="1 of 10 rows are malformed"):
        load_prompts(f, max_skipped_fraction=0.05)


def test_threshold_counts_over_all_files_and_lists_the_first_rows(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [GOOD, {"answer": "1"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": 1}] * 7 + [GOOD])
    with pytest.raises(DatasetError) as err:
        load_prompts([a, b], max_skipped_fraction=0.5)
    msg = str(err.value)
    assert msg.startswith("8 of 10 rows are malformed") and f"{a}:2: needs" in msg and f"{b}:1: field" in msg
    assert f"{b}:5:" not in msg and "(3 more)" in msg  # the first five are listed, the rest counted
    with pytest.raises(DatasetError, match="no usable rows"):
        load_prompts(write_jsonl(tmp_path / "c.jsonl", [{"x": 1}]), max_skipped_fraction=1.0)


def test_file_errors(tmp_path):
    with pytest.raises(DatasetError, match="missing.jsonl: no such dataset file"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DatasetError, match="is not a file"):
        load_prompts(str(tmp_path))
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(DatasetError, match="x.csv: unknown dataset format '.csv'"):
        load_prompts(str(tmp_path / "x.csv"))
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="e.jsonl: the dataset has no rows"):
        load_prompts(str(tmp_path / "e.jsonl"))
    with pytest.raises(DatasetError, match="no dataset files"):
        load_prompts([])
    with pytest.raises(DatasetError, match=r"unknown schema field\(s\) \['promt'\]"):
        load_prompts(str(tmp_path / "e.jsonl"), fields={"promt": "q"})
    with pytest.raises(DatasetError, match="max_skipped_fraction must be in"):
        load_prompts(str(tmp_path / "e.jsonl"), max_skipped_fraction=2)


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [GOOD, {"prompt": "3+3=", "answer": "6", "expert": None, "teachers": []}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    got, report = load_prompts(tmp_path / "d.parquet")
    assert [(e.prompt, e.answer, e.expert, e.teachers, e.line) for e in got] == [
        ("2+2=", "4", "4", ("4", "5"), 1),
        ("3+3=", "6", None, (), 2),
    ]
    # Chat rows (a list<struct> column), renamed columns, numeric answers and a bad row with its row number.
    chat = [
        {"conv": [{"role": "user", "content": "hi"}], "sol": 1.5},
        {"conv": [{"role": "user", "content": "yo"}], "sol": float("nan")},
    ]
    pq.write_table(pa.Table.from_pylist(chat), tmp_path / "c.parquet", row_group_size=1)
    with pytest.raises(DatasetError, match=r"c.parquet:2: field 'sol' is nan"):
        load_prompts(str(tmp_path / "c.parquet"), fields={"messages": "conv", "answer": "sol"})
    got, _ = load_prompts(
        str(tmp_path / "c.parquet"), fields={"messages": "conv", "answer": "sol"}, max_skipped_fraction=0.5
    )
    assert got[0].messages == (("user", "hi"),) and got[0].answer == "1.5" and got[0].line == 1
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DatasetError, match="bad.parquet: cannot read Parquet"):
        load_prompts(str(tmp_path / "bad.parquet"))


# ------------------------------------------------------------------------------------------ tokenizers
def test_toy_tokenizer_loads_through_the_hf_path(tmp_path):
    from gift_megatron.data.toy import write_toy_task

    paths = write_toy_task(tmp_path / "toy", num_train=10, num_eval=2, seed=3)
    assert (tmp_path / "toy" / "tokenizer" / "tokenizer.json").is_file()
    tok = Tokenizer.load(paths["tokenizer"])
    assert tok.kind == "hf" and (tok.pad_id, tok.eos_id, tok.bos_id, tok.vocab_size) == (0, 1, 2, 17)
    rows, _ = load_prompts(paths["train"])
    ids = tok.prompt_ids(rows[0])
    assert tok.decode(ids) == rows[0].prompt and len(ids) == 4  # one token per character, no BOS
    assert tok.encode("12") == [4, 5] and tok.decode(tok.encode("12") + [tok.eos_id, tok.pad_id]) == "12"
    check_vocab(tok, 17)
    with pytest.raises(ValueError, match="has 17 tokens but model.vocab_size is 16"):
        check_vocab(tok, 16)
    with pytest.raises(ValueError, match="has no chat_template"):
        Tokenizer.load(paths["tokenizer"], use_chat_template=True)
    with pytest.raises(FileNotFoundError, match="nope does not exist"):
        Tokenizer.load(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="not a sentencepiece .model"):
        Tokenizer.load(paths["train"])


def test_bos_is_prepended_when_the_tokenizer_adds_one(tmp_path):
    from tokenizers import processors

    from gift_megatron.data.toy import build_tokenizer

    hf = build_tokenizer()
    hf.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 2)]
    )
    hf.save_pretrained(tmp_path / "bos")
    tok = Tokenizer.load(tmp_path / "bos")
    ex = PromptExample(prompt="1+2=", messages=None, answer="3")
    assert tok.prompt_ids(ex) == [2, 4, 13, 5, 15]  # BOS once, from the tokenizer's own post-processor
    assert tok.encode("1") == [4]  # encode never adds it: responses are appended after the prompt


def test_chat_template(tmp_path):
    from gift_megatron.data.toy import build_tokenizer

    hf = build_tokenizer()
    # Only characters of the toy vocabulary; the generation prompt and a template variable are visible.
    hf.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}-{% endif %}"
        "{{ m['content'] }}={% endfor %}{% if add_generation_prompt %} {% endif %}"
        "{% if flag is defined and flag %}+{% endif %}"
    )
    hf.save_pretrained(tmp_path / "chat")
    f = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"messages": [{"role": "system", "content": "0"}, {"role": "user", "content": "1+2"}], "answer": "3"},
            {"prompt": "4+4", "answer": "8"},
        ],
    )
    a, b = load_prompts(f)[0]
    plain = Tokenizer.load(tmp_path / "chat")
    ids = plain.prompt_ids(a)
    assert ids[0] == plain.bos_id and ids.count(plain.bos_id) == 1  # BOS from the template, not added twice
    assert plain.decode(ids) == "-0=1+2= "  # chat rows always use the template, with the generation prompt
    assert plain.decode(plain.prompt_ids(b)) == "4+4"  # plain prompts only with use_chat_template
    chat = Tokenizer.load(tmp_path / "chat", use_chat_template=True)
    assert chat.decode(chat.prompt_ids(b)) == "4+4= "
    flagged = Tokenizer.load(tmp_path / "chat", use_chat_template=True, chat_template_kwargs={"flag": True})
    assert flagged.decode(flagged.prompt_ids(b)) == "4+4= +"
    # A chat row with a tokenizer that has no template: the row and the tokenizer are named.
    none = Tokenizer(build_tokenizer(), "hf", source="toy-tok")
    with pytest.raises(ValueError, match=r"c.jsonl:1: a chat row needs a tokenizer with a chat template \(toy-tok"):
        none.prompt_ids(a)


def test_sentencepiece_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    rng = random.Random(0)
    sentences = [
        " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "one", "two"]) for _ in range(8)) for _ in range(300)
    ]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        vocab_size=20,
        model_type="unigram",
        bos_id=1,
        eos_id=2,
        pad_id=0,
        unk_id=3,
    )
    (tmp_path / "t.model").write_bytes(buf.getvalue())
    tok = Tokenizer.load(str(tmp_path / "t.model"))
    assert tok.kind == "sentencepiece" and (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 0, 20)
    f = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "alpha beta", "answer": "x"}])
    ex = load_prompts(f)[0][0]
    ids = tok.prompt_ids(ex)
    assert ids[0] == 1 and tok.decode(ids[1:]) == "alpha beta" and ids[1:] == tok.encode("alpha beta")
    assert tok.decode(ids + [tok.eos_id]) == "alpha beta"
    check_vocab(tok, 20)
    with pytest.raises(ValueError, match="has 20 tokens but model.vocab_size is 19"):
        check_vocab(tok, 19)
    with pytest.raises(ValueError, match="has no chat template"):
        Tokenizer.load(str(tmp_path / "t.model"), use_chat_template=True)
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="cannot load sentencepiece model"):
        Tokenizer.load(str(tmp_path / "bad.model"))


# ------------------------------------------------------------------------------------------ toy task
@pytest.mark.parametrize("task, answers", [("add", range(19)), ("add_mod10", range(10))])
def test_toy_task_rows(tmp_path, task, answers):
    from gift_megatron.data.toy import write_toy_task

    paths = write_toy_task(tmp_path, num_train=300, num_eval=20, seed=0, task=task)
    train, _ = load_prompts(paths["train"])
    evals, _ = load_prompts(paths["eval"])
    assert len(train) == 300 and len(evals) == 20
    for ex in train:
        a, b = int(ex.prompt[0]), int(ex.prompt[2])
        want = a + b if task == "add" else (a + b) % 10
        assert ex.prompt == f"{a}+{b}=" and ex.answer == ex.expert == str(want) and int(ex.answer) in answers
        right, wrong, right2 = ex.teachers  # GFT groups get good and bad demonstrations
        assert right == right2 == ex.answer and wrong != ex.answer and int(wrong) in answers
    assert len({ex.answer for ex in train}) == len(answers)  # every answer occurs
    assert write_toy_task(tmp_path / "again", num_train=300, num_eval=20, seed=0, task=task)  # deterministic:
    assert (tmp_path / "again" / "train.jsonl").read_text() == (tmp_path / "train.jsonl").read_text()
    with pytest.raises(ValueError, match="unknown task 'mul'"):
        write_toy_task(tmp_path / "x", task="mul")


def test_toy_cli(tmp_path, monkeypatch, capsys):
    from gift_megatron.data import toy

    monkeypatch.setattr(
        "sys.argv", ["toy", "--out", str(tmp_path), "--num-train", "5", "--num-eval", "1", "--task", "add_mod10"]
    )
    toy.main()
    assert "train: " in capsys.readouterr().out
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 5
