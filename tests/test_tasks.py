"""Tasks, answer extraction, rewards and data loading (bundled, JSONL, Parquet) with clear errors."""

import json

import pytest

from trainer.rewards import RewardFunctionError, guarded, task_reward
from trainer.tasks import build_task, gsm8k_answer, read_rows
from trainer.tasks.arithmetic import add_without_carry
from trainer.tasks.countdown import evaluate


def test_arithmetic_rows_and_reward():
    task = build_task({"name": "arithmetic", "train_size": 50, "eval_size": 20, "max_digits": 2})
    train, held_out = task.splits(0)
    assert len(train) == 50 and len(held_out) == 20
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    row = train[0]
    a, b = row["prompt"].rstrip("=").split("+")
    assert int(row["answer"]) == int(a) + int(b)
    assert task.score(row["answer"], row) == 1.0
    assert task.score(f" {row['answer']}\nmore", row) == 1.0  # first integer counts
    assert task.score(str(int(row["answer"]) + 1), row) == 0.0
    assert task.score("abc", row) == 0.0
    assert task.splits(0) == (train, held_out)  # deterministic


def test_carry_noise_changes_demonstrations_only():
    clean = build_task({"name": "arithmetic", "train_size": 300, "eval_size": 10})
    noisy = build_task({"name": "arithmetic", "train_size": 300, "eval_size": 10, "demo_carry_noise": 1.0})
    c_train, c_eval = clean.splits(1)
    n_train, n_eval = noisy.splits(1)
    assert [r["prompt"] for r in c_train] == [r["prompt"] for r in n_train]
    assert [r["answer"] for r in c_train] == [r["answer"] for r in n_train]
    assert [(r["prompt"], r["answer"]) for r in c_eval] == [(r["prompt"], r["answer"]) for r in n_eval]
    assert any(r["solution"] != r["answer"] for r in n_train)
    for r in n_train:
        a, b = map(int, r["prompt"].rstrip("=").split("+"))
        assert r["solution"] == str(add_without_carry(a, b))
    assert add_without_carry(47, 385) == 322 and add_without_carry(12, 34) == 46


def test_too_small_task_space_is_reported():
    task = build_task({"name": "arithmetic", "train_size": 100, "eval_size": 150, "max_digits": 1})
    with pytest.raises(ValueError, match="distinct held-out problems"):
        task.splits(0)


def test_countdown_verifier():
    task = build_task({"name": "countdown", "train_size": 30, "eval_size": 5})
    train, _ = task.splits(0)
    for row in train:
        assert task.score(row["solution"], row) == 1.0
    row = {"numbers": "3 5 7", "answer": "22"}
    assert task.score("3*5+7", row) == 1.0
    assert task.score("7+3*5 trailing", row) == 1.0
    assert task.score("3*5+7+0", row) == 0.0  # 0 not given
    assert task.score("5*5-3", row) == 0.0  # 5 used twice
    assert task.score("3*5+8", row) == 0.0
    assert task.score("__import__('os')", row) == 0.0
    assert evaluate("2**3") is None and evaluate("(1+2)*3") == (9, [1, 2, 3])


def test_gsm8k_reward_on_bundled_examples():
    task = build_task({"name": "gsm8k"})
    train, held_out = task.splits(0)
    rows = train + held_out
    assert len(rows) == 8
    for row in rows:
        assert row["prompt"].startswith("Question: ") and row["prompt"].endswith("Answer:")
        assert task.score(row["solution"], row) == 1.0  # the reference solution earns the reward
        assert task.score(f"so the answer is\n#### {row['answer']}", row) == 1.0
        assert task.score(f"#### {int(float(row['answer'])) + 1}", row) == 0.0
        assert task.score(row["answer"], row) == 0.0  # no '####' marker: no answer
    assert gsm8k_answer("#### 1,200") == "1200"
    assert gsm8k_answer("#### $2.50") == "2.5"
    assert gsm8k_answer("first #### 3 then #### 4") == "4"
    assert gsm8k_answer("no marker 5") is None


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_local_jsonl_and_parquet(tmp_path):
    rows = [{"q": f"{i}+1=", "a": str(i + 1)} for i in range(12)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = {"name": "file", "source": str(tmp_path / "d.jsonl"), "prompt_field": "q", "answer_field": "a",
           "eval_size": 2}
    train, held_out = build_task(cfg).splits(0)
    assert len(train) == 10 and len(held_out) == 2
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert read_rows(str(tmp_path / "d.parquet")) == rows
    train2, _ = build_task(cfg | {"source": str(tmp_path / "d.parquet")}).splits(0)
    assert train2 == train


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"q": "1+1=", "a": "2"', r"d.jsonl:3: malformed JSON"),
        ('["not", "an", "object"]', r"d.jsonl:3: expected a JSON object"),
        ({"q": "1+1="}, r"row 2: missing field 'a' \(fields present: q\)"),
        ({"q": "1+1=", "a": {"x": 1}}, r"row 2: field 'a' must be a string or number"),
    ],
)
def test_malformed_rows_name_the_row(tmp_path, bad, message):
    write_jsonl(tmp_path / "d.jsonl", [{"q": "1+1=", "a": "2"}, {"q": "2+2=", "a": "4"}, bad])
    task = build_task({"name": "file", "source": str(tmp_path / "d.jsonl"), "prompt_field": "q", "answer_field": "a",
                       "eval_size": 1})
    with pytest.raises(ValueError, match=message):
        task.splits(0)


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        read_rows(str(tmp_path / "d.csv"))
    with pytest.raises(ValueError, match="needs task.source"):
        build_task({"name": "file"})


def test_task_reward_in_trl_signature():
    task = build_task({"name": "arithmetic", "train_size": 5, "eval_size": 1})
    fn = task_reward(task)
    assert fn.__name__ == "arithmetic_correct"
    out = fn(prompts=["1+2=", "3+4="], completions=["3", "8"], answer=["3", "7"], completion_ids=[[1], [2]])
    assert out == [1.0, 0.0]


def test_reward_function_that_raises_names_row_and_completion():
    def flaky(prompts, completions, **kw):
        return [1.0 / (len(c) - 3) for c in completions]

    with pytest.raises(RewardFunctionError, match=r"'flaky' raised ZeroDivisionError.*row 1 \(completion 'abc'\)"):
        guarded(flaky)(["p", "p"], ["abcd", "abc"])
    with pytest.raises(RewardFunctionError, match="returned 1 rewards for 2"):
        guarded(lambda prompts, completions, **kw: [0.0])(["p", "p"], ["a", "b"])


def test_rows_carry_a_domain_label():
    from trainer.tasks import build_task

    task = build_task({"name": "arithmetic", "operators": ["+", "-"], "train_size": 50, "eval_size": 10})
    train, _ = task.splits(0)
    assert {task.domain_of(r) for r in train} == {"addition", "subtraction"}
    assert task.domain_of({"prompt": "x"}) == "arithmetic"  # rows without a label fall back to the task name
