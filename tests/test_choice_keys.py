"""data/choice_keys.py: where a multiple-choice answer's option is written, on hand-made
token texts (no tokenizer)."""

import numpy as np

from dynllava_jax.data.choice_keys import answer_runs, choice_keys, option_letters, option_span

I = -100


def _example(turns):
    """(texts, labels) from [(token texts of a prompt, token texts of its answer)]."""
    texts, labels = [], []
    for prompt, answer in turns:
        texts += prompt
        labels += [I] * len(prompt)
        texts += answer
        labels += [1] * len(answer)
    return texts, labels


def test_the_chosen_options_tokens_are_marked_with_the_answers_rank():
    q1 = ["Which", " colour", "?", "\n", "A", ".", " gre", "en", "\n", "B", ".", " red", "\n",
          "Answer", "."]
    q2 = ["Say", " B", "?", " ASSISTANT", ":"]                     # no options: not marked
    q3 = ["\n", "A", ".", " ", "3", "\n", "B", ".", " ", "4", "\n", "C", ".", " 5", "\n", "Answer",
          " ASSISTANT:"]
    texts, labels = _example([(q1, [" A", ""]), (q2, [" B", ""]), (q3, [" C.", ""]),
                              (q1, [" yes", ""])])                # not a letter: not marked
    got = choice_keys(texts, labels)
    want = np.full(len(texts), -1)
    want[[6, 7]] = 0                                             # " gre", "en"
    s3 = len(q1) + 2 + len(q2) + 2
    want[s3 + 13] = 2                                            # " 5"
    np.testing.assert_array_equal(got, want)
    assert answer_runs(labels)[1] == (len(q1) + 2 + len(q2), len(q1) + 2 + len(q2) + 2)


def test_option_span_needs_exactly_one_line_for_the_letter():
    assert option_span("Q?\nA. cat\nB. dog\n", "B") == (13, 16)
    assert option_span("Q?\nA. cat\nA. dog\n", "A") is None
    assert option_span("Q?\nA. cat\n", "D") is None
    assert option_span("A. cat", "A") == (3, 6)


def test_option_letters_point_every_options_text_at_its_letter():
    q1 = ["Which", " colour", "?", "\n", "A", ".", " gre", "en", "\n", "B", ".", " red", "\n",
          "Answer", "."]
    q2 = ["\n", "C. 4", "\n", "D", ".", " ", "5", "\n", "Answer", " ASSISTANT:"]  # C: one token
    texts, labels = _example([(q1, ["\n", "A", ".", " x"]), (q2, [" D", ""])])
    got = option_letters(texts, labels)
    want = np.full(len(texts), -1)
    want[[6, 7]] = 4                       # " gre", "en" -> "A"
    want[11] = 9                           # " red" -> "B"
    s2 = len(q1) + 4
    want[s2 + 6] = s2 + 3                  # "5" -> "D"; the answer's "A. x" is not a prompt
    np.testing.assert_array_equal(got, want)
