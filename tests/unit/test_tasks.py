"""The task families of the base model's corpus and of its post-training target (rollout/tasks.py)."""

import random

import pytest

from rollout.tasks import FAMILIES, held_out, held_out_size, make_task_sets


@pytest.mark.parametrize("family", list(FAMILIES))
def test_answers_are_right(family):
    rng = random.Random(1)
    for _ in range(200):
        prompt, answer = FAMILIES[family](rng)
        assert prompt.endswith("=")
        body = prompt[:-1]
        if family == "rev":
            assert answer == body.removeprefix("rev ")[::-1]
        elif family in ("sort", "sortrep"):
            assert answer == "".join(sorted(body.removeprefix("sort ")))
            if family == "sortrep":  # the same instruction as sort, on 4-7 letters of a-e
                assert set(answer) <= set("abcde") and 4 <= len(answer) <= 7
        elif family == "count":
            letter, s = body.removeprefix("count ").split(":")
            assert answer == str(s.count(letter))
        elif family == "upper":
            assert answer == body.removeprefix("upper ").upper()
        else:
            a, b = body.split("+")
            assert answer == str(int(a) + int(b))
            assert (len(a), len(b)) == ((3, 3) if family == "add3" else (len(a), len(b)))
            assert family == "add3" or max(int(a), int(b)) < 100


def test_examples_from_the_docstrings():
    # the forms the README and the base model's card describe
    assert FAMILIES["rev"](random.Random(0))[0].startswith("rev ")
    assert FAMILIES["count"](random.Random(0))[0].startswith("count ")


def test_sortrep_repeats_letters():
    # the target's point: most of its strings hold a letter more than once (7 letters of 5 always do), where the
    # base's sort rows of the whole alphabet seldom do
    rng = random.Random(2)
    repeats = [len(set(p[5:-1])) < len(p[5:-1]) for p, _ in (FAMILIES["sortrep"](rng) for _ in range(1000))]
    # P(no repeat) = 5!/(5-n)!/5^n: 120/625 = 0.192 (n=4), 120/3125 = 0.038 (n=5), 0 (n=6, 7); so P(repeat) =
    # 1 - (0.192 + 0.038) / 4 = 0.942 with the length uniform in 4-7; sd of the count of 1000 is about 7
    assert 920 < sum(repeats) < 965


def test_held_out_rows_are_never_trained_on_and_fixed_by_the_seed():
    sets = make_task_sets({"rev": 1, "add2": 1, "add3": 0.5}, ["add3", "rev", "sort"], seed=0, num_prompts=3000,
                          num_expert=3000, num_eval=100)
    pool = {p for f in FAMILIES for p, _ in held_out(f, 0, held_out_size(100))}
    trained = {r["prompt"] for r in sets["prompts"] + sets["expert"]}
    assert not trained & pool
    # the pretraining mixture, another size, another run: the same held-out rows, so retention is measured on rows
    # the base never saw
    other = make_task_sets({"sort": 1}, ["sort", "add3"], seed=0, num_prompts=10, num_expert=10, num_eval=100)
    assert other["eval/add3"] == sets["eval/add3"]
    assert {r["prompt"] for r in other["eval/sort"]} == {r["prompt"] for r in sets["eval/sort"]}
    assert make_task_sets({"sort": 1}, ["add3"], seed=1, num_prompts=1, num_expert=1,
                          num_eval=100)["eval/add3"] != sets["eval/add3"]


def test_a_family_sharing_a_prompt_form_trains_around_the_others_held_out_rows():
    # sort draws strings of a-z, so some are sortrep instances: none of them may be sortrep's held-out rows
    sets = make_task_sets({"sort": 1}, ["sortrep"], seed=0, num_prompts=20000, num_expert=20000, num_eval=200)
    pool = {p for p, _ in held_out("sortrep", 0, held_out_size(200))}
    trained = [r["prompt"] for r in sets["prompts"] + sets["expert"]]
    like = [p for p in trained if set(p[5:-1]) <= set("abcde") and 4 <= len(p[5:-1]) <= 7]
    assert like and not pool & set(trained)  # there are sortrep-like rows, and none is held out


def test_mixture_shares_and_fields():
    sets = make_task_sets({"rev": 3, "add2": 1}, ["rev"], seed=0, num_prompts=4000, num_expert=10, num_eval=10)
    share = sum(r["family"] == "rev" for r in sets["prompts"]) / 4000
    assert 0.72 < share < 0.78  # 3 / (3 + 1), within about 3 standard deviations (0.007 each)
    assert set(sets["prompts"][0]) == {"prompt", "answer", "family"}
    assert set(sets["expert"][0]) == {"prompt", "response", "family"}
    assert len(sets["eval/rev"]) == 10 and len({r["prompt"] for r in sets["eval/rev"]}) == 10


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="unknown task families \\['add4'\\]"):
        make_task_sets({"add4": 1}, [], seed=0, num_prompts=1, num_expert=1, num_eval=1)
