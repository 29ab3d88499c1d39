"""Prompt datasets and tokenizers: schema errors with file and line, the skip threshold, Parquet, chat
templates, sentencepiece, the toy task."""

from __future__ import annotations

import io
import json
import random

import pytest

from gift_megatron.data import DatasetError, Tokenizer, check_vocab, load_prompts


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


GOOD = {"prompt": "2+2=", "answer": "4", "expert": "4", "teachers": ["4", "5"]}


def test_jsonl_rows_with_fields_and_renames(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [GOOD, {"question": "q?", "answer": 7},
                                           {"messages": [{"role": "user", "content": "hi"}], "answer": "x"}])
    with pytest.raises(DatasetError, match=r"a.jsonl:2: needs 'prompt' or 'messages'"):
        load_prompts(f)
    rows, report = load_prompts(f, fields={"prompt": "question"}, max_skipped_fraction=0.5)
    # With the rename, row 1 lacks 'question': skipped and reported, not silently dropped.
    assert report.rows == 3 and [(s[1], s[2]) for s in report.skipped] == [(1, "needs 'question' or 'messages'")]
    assert rows[0].prompt == "q?" and rows[0].answer == "7" and rows[0].line == 2
    assert rows[1].messages == (("user", "hi"),) and rows[1].prompt_text == "hi"


@pytest.mark.parametrize("row, reason", [
    ('{"prompt": "x", ', "invalid JSON"),
    ({"answer": "1"}, "needs 'prompt' or 'messages'"),
    ({"prompt": 3}, "field 'prompt' must be a string"),
    ({"prompt": "  "}, "empty prompt"),
    ({"prompt": "p", "teachers": "t"}, "field 'teachers' must be a list of strings"),
    ({"messages": [{"role": "user"}]}, "messages[0] must be"),
    ([1, 2], "expected an object"),
])
def test_malformed_rows_name_file_line_and_reason(tmp_path, row, reason):
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, row])
    with pytest.raises(DatasetError) as err:
        load_prompts(f)
    assert f"{f}:3: {reason}" in str(err.value) and "1 of 3 rows are malformed" in str(err.value)


def test_threshold_allows_and_logs_skips(tmp_path, caplog):
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 9 + [{"answer": "1"}])
    rows, report = load_prompts(f, max_skipped_fraction=0.1)
    assert len(rows) == 9 and len(report.skipped) == 1
    assert "skipped 1 of 10 malformed rows" in caplog.text
    with pytest.raises(DatasetError, match="1 of 10 rows are malformed"):
        load_prompts(f, max_skipped_fraction=0.05)


def test_file_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset file"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(DatasetError, match="unknown dataset format '.csv'"):
        load_prompts(str(tmp_path / "x.csv"))
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="has no rows"):
        load_prompts(str(tmp_path / "e.jsonl"))
    with pytest.raises(DatasetError, match="unknown field"):
        load_prompts(str(tmp_path / "e.jsonl"), fields={"promt": "q"})


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [GOOD, {"prompt": "3+3=", "answer": "6", "expert": None, "teachers": []}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    got, report = load_prompts(str(tmp_path / "d.parquet"))
    assert [(e.prompt, e.answer, e.expert, e.teachers, e.line) for e in got] == [
        ("2+2=", "4", "4", ("4", "5"), 1), ("3+3=", "6", None, (), 2)]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DatasetError, match="bad.parquet: cannot read Parquet"):
        load_prompts(str(tmp_path / "bad.parquet"))


def test_toy_tokenizer_and_chat_template(tmp_path):
    from gift_megatron.data.toy import build_tokenizer, write_toy_task

    paths = write_toy_task(str(tmp_path / "toy"), num_train=10, num_eval=2, seed=3)
    tok = Tokenizer.load(paths["tokenizer"])
    rows, _ = load_prompts(paths["train"])
    ids = tok.prompt_ids(rows[0])
    assert tok.decode(ids) == rows[0].prompt and len(ids) == 4  # one token per character, no BOS
    assert tok.decode(tok.encode("12") + [tok.eos_id]) == "12"
    check_vocab(tok, 32)
    with pytest.raises(ValueError, match="has 17 tokens but model.vocab_size is 16"):
        check_vocab(tok, 16)
    # A chat template set on the tokenizer is applied to chat rows.
    hf = build_tokenizer()
    hf.chat_template = "{% for m in messages %}-{{ m['content'] }}={% endfor %}"  # characters the toy vocab has
    hf.save_pretrained(tmp_path / "chat")
    chat = Tokenizer.load(str(tmp_path / "chat"), use_chat_template=True)
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "1+2"}], "answer": "3"},
                                           {"prompt": "4+4", "answer": "8"}])
    a, b = load_prompts(f)[0]
    assert chat.decode(chat.prompt_ids(a)) == "-1+2="
    assert chat.decode(chat.prompt_ids(b)) == "-4+4="  # use_chat_template wraps plain prompts too
    with pytest.raises(ValueError, match="has no chat_template"):
        Tokenizer.load(paths["tokenizer"], use_chat_template=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.load(str(tmp_path / "nope"))


def test_sentencepiece_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(["alpha", "beta", "gamma", "delta", "one", "two"]) for _ in range(8))
                 for _ in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, vocab_size=20,
                                   model_type="unigram", bos_id=1, eos_id=2, pad_id=0, unk_id=3)
    (tmp_path / "t.model").write_bytes(buf.getvalue())
    tok = Tokenizer.load(str(tmp_path / "t.model"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 0, 20)
    f = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "alpha beta", "answer": "x"}])
    ex = load_prompts(f)[0][0]
    ids = tok.prompt_ids(ex)
    assert ids[0] == 1 and tok.decode(ids[1:]) == "alpha beta"
