import json

import pytest
import torch

from pktlib import data
from pktlib.errors import DataError, PktError


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"id": "x1", "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]})


@pytest.mark.parametrize("bad, message", [
    ('{"messages": [', "malformed JSON"),
    ('{"text": "no messages"}', "missing 'messages'"),
    (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}), "role 'robot'"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "last message has role 'user'"),
    (json.dumps({"messages": []}), "non-empty list"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path / "d.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(DataError) as e:
        data.load_examples(path)
    assert isinstance(e.value, ValueError)
    assert f"{path}:3:" in str(e.value) and message in str(e.value)


def test_empty_file_is_an_error(tmp_path):
    path = _write(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError, match="empty file"):
        data.load_examples(path)


def test_load_examples_keeps_meta(tmp_path):
    ex = data.load_examples(_write(tmp_path / "d.jsonl", [GOOD]))[0]
    assert ex.meta == {"id": "x1"} and ex.answer == "4" and ex.prompt_messages[0]["content"] == "2+2?"


def test_local_jsonl_as_task(tmp_path):
    path = _write(tmp_path / "mine.jsonl", [GOOD, GOOD])
    assert len(data.load_task(str(path))) == 2


def test_format_prompt_default_template():
    msgs = [{"role": "user", "content": "Question?"}, {"role": "assistant", "content": "Answer."}]
    assert data.format_prompt(msgs) == "<|user|>\nQuestion?\n\n<|assistant|>\n"
    # the answer is dropped; a prompt without an answer formats the same
    assert data.format_prompt(msgs[:1]) == data.format_prompt(msgs)


def test_format_prompt_chat_template_needs_template(tokenizer):
    with pytest.raises(PktError, match="chat template"):
        data.format_prompt([{"role": "user", "content": "hi"}], tokenizer=tokenizer, template="chat")


def test_format_prompt_auto_template_follows_the_tokenizer(tokenizer):
    import copy
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]
    # no chat template: the default format
    assert data.format_prompt(msgs, tokenizer=tokenizer, template="auto") == data.format_prompt(msgs)
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "
    assert data.format_prompt(msgs, tokenizer=chat, template="auto") == "[user] hi\n[assistant] "
    with pytest.raises(PktError, match="'auto'"):
        data.format_prompt(msgs, template="tulu")


@pytest.mark.parametrize("task, split, n", [
    ("gsm", "extract", 20), ("gsm8k", "test", 1319), ("mmlu", "align", 80), ("mmlu", "test", 14042),
    ("humaneval", "test", 164), ("mbpp", "test", 500), ("mbpp", "train", 300),
])
def test_real_task_sizes(task, split, n):
    assert len(data.load_task(task, split)) == n


@pytest.mark.parametrize("task", ["gsm8k", "mmlu", "humaneval", "mbpp"])
def test_every_example_of_the_extract_align_and_train_splits_has_its_own_id(task):
    ids = [ex.id for split in ("extract", "align", "train") for ex in data.load_task(task, split)]
    assert all(ids) and len(set(ids)) == len(ids)
    if task in ("humaneval", "mbpp"):  # their files carry none: named after the file and line
        assert data.load_task(task, "align")[3].id == f"{task}_align_3"


def test_gold_answers_parsed():
    gsm = data.load_task("gsm8k", "test", limit=3)
    assert [e.meta["answer"] for e in gsm] == ["18", "3", "70000"]
    assert gsm[0].answer.endswith("So the answer is 18.")
    mmlu = data.load_task("mmlu", "extract")
    assert all(e.meta["answer"] in ("A", "B", "C", "D") for e in mmlu)
    assert all(e.meta["answer"] == e.answer[-1] for e in mmlu)
    mbpp = data.load_task("mbpp", "test")
    assert mbpp[0].meta["task_id"] == 11 and mbpp[-1].meta["task_id"] == 510
    assert mbpp[0].meta["tests"][0] in mbpp[0].messages[0]["content"]


def test_unknown_task_and_split():
    with pytest.raises(PktError, match="unknown task 'nope'.*gsm8k"):
        data.load_task("nope")
    with pytest.raises(PktError, match="has no split 'dev'"):
        data.load_task("gsm8k", "dev")


def test_data_dir_env_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("PKT_DATA", str(tmp_path / "missing"))
    with pytest.raises(PktError, match="PKT_DATA=.*not a directory"):
        data.load_task("gsm8k", "test")


def test_label_masking_and_truncation(tokenizer):
    ex = data.Example([{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "So the answer is 7."}])
    item = data.tokenize_example(tokenizer, ex)
    n_prompt = len(tokenizer(data.format_prompt(ex.messages))["input_ids"])
    assert item["labels"][:n_prompt] == [-100] * n_prompt
    assert item["labels"][n_prompt:] == item["input_ids"][n_prompt:]
    assert item["input_ids"][-1] == tokenizer.eos_token_id
    full = data.tokenize_example(tokenizer, ex, train_on_inputs=True)
    assert full["labels"] == full["input_ids"]
    short = data.tokenize_example(tokenizer, ex, max_length=5)
    assert short["truncated"] and len(short["input_ids"]) == 5
    with pytest.warns(UserWarning, match="1 of 2 examples were truncated"):
        batch = data.collate([item, short], tokenizer.pad_token_id)
    assert batch.n_truncated == 1
    assert batch.input_ids.shape == (2, len(item["input_ids"]))
    assert batch.attention_mask[1].sum() == 5 and (batch.labels[1, 5:] == -100).all()


def test_left_padding(tokenizer):
    a = {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}
    b = {"input_ids": [8], "labels": [-100]}
    batch = data.collate([a, b], 0, padding_side="left")
    assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert torch.equal(batch.labels[1], torch.tensor([-100, -100, -100]))


# ---------------------------------------------------------------------------- tokenisation as the model sees it
def _sentencepiece_tokenizer():
    """A SentencePiece-style tokenizer (BPE over Metaspace pre-tokens, "▁" marking word starts,
    BOS added), like Llama-2's, trained on a few lines in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = ["<|user|>\nWhat is the capital of France?\n\n<|assistant|>\nThe answer is Paris.",
              "Question: Tom has 12 apples. Answer: So the answer is 7.", "The answer is: B"] * 8
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("prompt, answer, separate_differs", [
    ("<|user|>\nWhat is the capital of France?\n\n<|assistant|>\n", "The answer is Paris.", True),
    ("Question: Tom has 12 apples. Answer:", " So the answer is 7.", False),  # a space: the same either way
    ("The answer is:", "B", True),
])
def test_tokenize_example_is_the_joined_text_with_prompt_masked(prompt, answer, separate_differs):
    tok = _sentencepiece_tokenizer()
    item = data.tokenize_example(tok, (prompt, answer))
    joined = tok(prompt + answer)["input_ids"]
    assert item["input_ids"] == joined + [tok.eos_token_id]  # exactly what the model sees, plus EOS
    # Separate calls give other ids: the answer alone starts with a word-boundary marker "▁".
    separate = tok(prompt)["input_ids"] + tok(answer, add_special_tokens=False)["input_ids"]
    assert (separate != joined) == separate_differs
    # The prompt's tokens (by character offsets) are masked, every answer token and EOS is a label.
    offsets = tok(prompt + answer, return_offsets_mapping=True)["offset_mapping"]
    n_prompt = next(i for i, (s, e) in enumerate(offsets) if e > len(prompt) and e > s)
    assert item["n_prompt"] == n_prompt
    assert item["labels"] == [-100] * n_prompt + joined[n_prompt:] + [tok.eos_token_id]
    # A token straddling the boundary carries answer characters, so it is a label (never hidden).
    assert tok.decode(item["input_ids"][n_prompt:-1]).strip().endswith(answer.strip())
    assert prompt.startswith(tok.decode(item["input_ids"][:n_prompt], skip_special_tokens=True).rstrip())
    assert data.tokenize_example(tok, (prompt, answer), train_on_inputs=True)["labels"] == item["input_ids"]


def test_every_pair_tokeniser_is_tokenize_example(tokenizer):
    """Attribution, Seeking, LaTen, fine-tuning, the zoo's training and distillation read the same ids for a
    (prompt, answer) pair."""
    from pktlib.attribution import STRIP_CHARS, _encode

    tok = _sentencepiece_tokenizer()
    pair = ("<|user|>\nWhat is the capital of France?\n\n<|assistant|>\n", "The answer is Paris.")
    assert _encode(tok, [pair])[0] == tok(pair[0] + pair[1].rstrip(STRIP_CHARS))["input_ids"]
    import inspect

    from pktlib import distill, postalign, seeking
    from pktlib.laten import method as laten_method
    from pktlib.zoo import build as zoo_build

    for mod in (seeking, laten_method, postalign, zoo_build, distill):
        src = inspect.getsource(mod)
        assert "tokenize_example(" in src, mod.__name__
        assert "add_special_tokens=False" not in src, mod.__name__  # no separate answer tokenisation


# ---------------------------------------------------------------------------- validation by exact membership
def _mmlu_dir(tmp_path, rows: str):
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    f = tmp_path / "mmlu" / "test" / "toy_test.csv"
    f.write_text(rows, encoding="utf-8")
    return f


@pytest.mark.parametrize("rows, line, message", [
    ('What?,a,b,c,d,A\nWhy?,a,b,c,d,\n', 2, "answer field is ''"),
    ('What?,a,b,c,d,AB\n', 1, "answer field is 'AB'"),
    ('"A question\nover two lines",a,b,c,d,A\nWhy?,a,b,c,d,E\n', 3, "answer field is 'E'"),
    ('What?,a,b,c,A\n', 1, "expected 6 fields"),
    (',a,b,c,d,A\n', 1, "empty question"),
])
def test_mmlu_csv_bad_rows_name_file_and_line(tmp_path, monkeypatch, rows, line, message):
    f = _mmlu_dir(tmp_path, rows)
    monkeypatch.setenv("PKT_DATA", str(tmp_path))
    with pytest.raises(DataError) as e:
        data.load_task("mmlu", "test")
    assert str(e.value).startswith(f"{f}:{line}: ") and message in str(e.value)


def test_mmlu_meta_holds_question_and_choices():
    ex = data.load_task("mmlu", "test", limit=1)[0]
    assert ex.meta["question"].startswith("Find the degree") and len(ex.meta["choices"]) == 4
    assert ex.meta["choices"][1] == "4" and ex.meta["answer"] == "B"


def test_mbpp_sanitized_test_split():
    exs = data.load_task("mbpp", "sanitized-test")
    ids = [e.meta["task_id"] for e in exs]
    assert len(exs) == 427 - data.MBPP_PLUS_HOLDOUT == 327 and ids == sorted(ids) and ids[0] == 170
    assert all(e.meta["text"] and e.meta["tests"] and e.meta["reference"] for e in exs)
    assert exs[0].meta["tests"][0] in exs[0].messages[0]["content"]
