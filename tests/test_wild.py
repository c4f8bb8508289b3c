"""The WILD scorer on hand-made generations: the cut, normalisation, the judgements, echo, entropy."""

from __future__ import annotations

import pytest

from editstream import wild


@pytest.mark.parametrize(
    "text, answer",
    [
        (" Lyon. It is a city", "Lyon"),
        (" Lyon\nThe capital", "Lyon"),
        (" Lyon", "Lyon"),
        (" LyonThe capital of France. Lyon", "LyonThe capital of France"),
        ("", ""),
        (". Lyon", ""),
    ],
)
def test_cut_stops_at_the_first_full_stop_or_newline(text, answer):
    assert wild.cut(text) == answer


def test_a_target_with_a_full_stop_is_not_cut_inside_itself():
    assert wild.cut(" Robert C. Newton. He was", "Robert C. Newton") == "Robert C. Newton"
    assert wild.cut(" Robert Newton. He was", "Robert C. Newton") == "Robert Newton"


def test_an_initial_written_with_its_dot_is_read_through_only_when_the_whole_name_follows():
    assert wild.cut(" Robert J. Flaherty, 1922. It", "Robert J Flaherty") == "Robert J. Flaherty, 1922"
    assert wild.cut(" Robert J. Reyes, 1999. It", "Robert J Flaherty") == "Robert J"
    assert wild.cut(" Robert J.\nFlaherty", "Robert J Flaherty") == "Robert J."  # a newline always ends it
    assert wild.cut(" Robert J. Flaherty", "") == "Robert J"


@pytest.mark.parametrize(
    "text, expected", [("Robert J", True), ("Robert J Flaherty", False), ("", False), ("Robert K", False)]
)
def test_within_says_whether_a_text_is_so_far_the_targets_first_words(text, expected):
    assert wild.within(text, "Robert J Flaherty") is expected


def test_a_text_that_goes_on_to_say_the_whole_target_is_answer_first():
    assert wild.answer_first("Robert J. Flaherty wrote", "Robert J Flaherty")
    assert not wild.answer_first("Robert J", "Robert J Flaherty")


def test_normalize_drops_case_punctuation_and_articles():
    assert wild.normalize("  The  Eiffel-Tower, an icon!") == "eiffel tower icon"
    assert wild.normalize("A") == ""


def test_exact_and_answer_first():
    assert wild.exact("the Lyon", "Lyon")
    assert not wild.exact("Rome, Italy", "Rome")
    assert wild.answer_first("Rome, Italy", "Rome")
    assert not wild.answer_first("LyonThe capital of France", "Lyon")
    assert not wild.answer_first("Romeo and Juliet", "Rome")
    assert wild.answer_first("New York City", "new york")
    assert not wild.answer_first("anything", "")


def test_contains_needs_whole_words_in_order():
    assert wild.contains("The capital of France is Lyon", "Lyon")
    assert wild.contains("It is in New York, I think", "New York")
    assert not wild.contains("It is in York New", "New York")
    assert not wild.contains("Lyonnais cuisine", "Lyon")


def test_echo_counts_whole_word_repeats():
    assert wild.echo(" Kiev, Kiev, Kiev, Kiev", "Kiev")
    assert not wild.echo(" Kiev is a city. Kiev has parks", "Kiev")
    assert wild.echo(" Wales. Wales is Wales. Wales is Wales.", "Wales")
    assert not wild.echo(" Walesby Walesby Walesby", "Wales")


def test_fluency_is_low_for_loops_and_higher_for_varied_text():
    loop = " Kiev, Kiev, Kiev, Kiev, Kiev, Kiev, Kiev, Kiev"
    varied = " Kiev is the capital of Ukraine and its largest city, on the Dnieper river"
    assert wild.ngram_entropy(loop, 2) == pytest.approx(0.0)
    assert wild.fluency(varied) > wild.fluency(loop) + 2
    # 6 distinct bigrams in 6: log2(6) bits
    assert wild.ngram_entropy("a b c d e f g", 2) == pytest.approx(2.585, abs=1e-3)
    assert wild.ngram_entropy("", 3) == 0.0


def test_judge_puts_it_together():
    j = wild.judge(" Lyon. Lyon is in France, and Lyon is large", "Lyon")
    assert (j.answer, j.exact, j.answer_first, j.contains, j.echo) == ("Lyon", True, True, True, True)
    bad = wild.judge(" LyonThe capital of France. LyonThe", "Lyon")
    assert (bad.exact, bad.answer_first, bad.contains) == (False, False, False)


def test_same_answer_compares_up_to_the_cut():
    assert wild.same_answer(" 100 degrees. It boils", " 100 degrees. Really")
    assert not wild.same_answer(" 90 degrees.", " 100 degrees.")
