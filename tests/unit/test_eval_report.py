"""The report's quality figures: the perplexity ratio, and repetition as the fraction of distinct 4-grams."""

import math

import pytest

from raydistill.eval.report import distinct_ngram_fraction, prompt_repeat_figures, repeats_prompt, repetition_figures, write_markdown
from raydistill.eval.stage import summarize


def test_distinct_four_grams_measure_repetition_per_answer():
    assert distinct_ngram_fraction(["the most the most the most the most"]) == pytest.approx(2 / 5)
    assert distinct_ngram_fraction(["a b c d e f"]) == 1.0
    # Averaged over the answers that have a 4-gram; a short answer has none and does not count.
    assert distinct_ngram_fraction(["a b c d e f", "x x x x x", "too short"]) == pytest.approx((1.0 + 0.5) / 2)
    assert distinct_ngram_fraction(["hi", ""]) is None and distinct_ngram_fraction([]) is None


def test_repetition_figures_compare_the_student_with_the_teacher():
    pairs = [{"prompt": "p", "student": "the most the most the most the most", "teacher": "a b c d e f g"}]
    rep = repetition_figures(pairs)
    assert rep == {"student_distinct4": pytest.approx(0.4), "teacher_distinct4": 1.0, "distinct4_ratio": pytest.approx(0.4)}
    assert repetition_figures([{"prompt": "p", "student": "x", "teacher": "y"}])["distinct4_ratio"] is None


def test_summary_has_the_perplexity_ratio_and_the_markdown_shows_the_new_figures(tmp_path):
    report = summarize({"tokens": 10, "student_nll": 30.0, "teacher_nll": 20.0, "kl": 5.0, "top1_agree": 6.0}, 2)
    assert report["ppl_ratio"] == pytest.approx(math.exp(1.0))
    assert report["ppl_ratio"] == pytest.approx(report["student"]["perplexity"] / report["teacher"]["perplexity"])
    for m, d4 in (("student", 0.4), ("teacher", 1.0)):
        report[m].update(parameters=10, bytes_on_disk=1000, distinct4=d4)
    write_markdown(report, tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    assert "| distinct 4-grams in greedy answers (1 = no repetition) | 0.40 | 1.00 |" in text
    assert "**Perplexity ratio** (student / teacher): 2.72." in text


def test_a_response_that_echoes_six_words_of_its_prompt_counts_as_a_repeat():
    prompt = "Summarize what scientists know about bread baking."
    assert repeats_prompt(prompt, "Summarize what scientists know about bread baking.\n\nSummarize what ...")
    assert repeats_prompt(prompt, "Sure. what scientists know about bread baking. is a lot")  # 6 words in the middle
    assert not repeats_prompt(prompt, "Bread rises because yeast makes carbon dioxide.")
    assert not repeats_prompt(prompt, "scientists know about bread baking.")  # 5 words only
    assert not repeats_prompt("Too short a prompt", "Too short a prompt")  # fewer than 6 words: nothing to repeat
    figures = prompt_repeat_figures([prompt, prompt, "Honey bees dance to tell the hive where food is"],
                                    [prompt, "Flour, water, salt.", "and the others follow the dance to the flowers"])
    assert figures == {"teacher_prompt_repeats": 1, "teacher_prompt_repeat_fraction": pytest.approx(1 / 3)}
    assert prompt_repeat_figures([], [])["teacher_prompt_repeat_fraction"] is None


def test_the_markdown_counts_the_teacher_responses_that_repeat_their_prompt(tmp_path):
    report = summarize({"tokens": 10, "student_nll": 30.0, "teacher_nll": 20.0, "kl": 5.0, "top1_agree": 6.0}, 2)
    for m in ("student", "teacher"):
        report[m].update(parameters=10, bytes_on_disk=1000)
    report.update(prompt_repeat_figures(["a b c d e f g", "one two three four five six"], ["a b c d e f g h", "no"]))
    write_markdown(report, tmp_path / "report.md")
    assert "**Teacher responses that repeat their prompt** (6 words of it or more): 1 of 2." in (tmp_path / "report.md").read_text()
