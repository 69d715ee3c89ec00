"""Adversarial corpus for the math checker: responses that must not be credited, and the
honest forms beside them that must be.

Every case is written for this file (none is copied from a dataset). A case is
`(response, reference, credited, reason)`: the verdict `verify_math(response, reference)`
must give with default options. Cases are grouped by attack class; `honest` is the control
class of forms that have to keep passing.
"""

from __future__ import annotations

import pytest

from gristmill.verify.math import verify_math

Case = tuple[str, str, bool, str]

CORPUS: dict[str, list[Case]] = {
    # Hedges: two candidate values offered for one answer ("N or M", "either", "or more").
    "hedge_or": [
        ("The answer is 18 or 19.", "18", False, "ambiguous"),
        ("\\boxed{18 \\text{ or } 19}", "18", False, "ambiguous"),
        ("The answer is 18, or maybe 19.", "18", False, "ambiguous"),
        ("The answer is either 18 or 19.", "18", False, "ambiguous"),
        ("\\boxed{18 \\text{ or more}}", "18", False, "ambiguous"),
        ("The answer is $\\frac{1}{2}$ or $\\frac{1}{3}$.", "\\frac{1}{2}", False, "ambiguous"),
        ("So it is \\boxed{18} or \\boxed{19}.", "19", False, "ambiguous"),
        ("The answer is 18 apples or 19 apples.", "18", False, "ambiguous"),
        ("The answer is $18 or $19.", "18", False, "ambiguous"),
        ("\\boxed{\\sqrt{2} \\text{ or } \\sqrt{3}}", "\\sqrt{2}", False, "ambiguous"),
        ("Final answer: 18 or 19", "19", False, "ambiguous"),
        ("The answer is 42 or so.", "42", False, "ambiguous"),
        ("The answer is \\boxed{7}, or possibly 8.", "7", False, "ambiguous"),
        ("The answer is 5 + 3 = 8 or 9.", "8", False, "ambiguous"),
    ],
    # Ranges: an interval of candidates where the reference is one number.
    "range": [
        ("\\boxed{18 to 28}", "18", False, "ambiguous"),
        ("The answer is 18 to 28 people.", "18", False, "ambiguous"),
        ("\\boxed{18-28}", "18", False, "ambiguous"),
        ("The answer is between 18 and 28.", "18", False, "ambiguous"),
        ("The answer is from 18 to 28.", "18", False, "ambiguous"),
        ("\\boxed{\\frac{1}{2} \\text{ to } \\frac{3}{4}}", "\\frac{1}{2}", False, "ambiguous"),
        ("\\boxed{18 \\text{ through } 20}", "18", False, "ambiguous"),
        ("The answer is 18 – 28.", "18", False, "ambiguous"),
        ("\\boxed{18 \\pm 1}", "18", False, "ambiguous"),
        ("\\boxed{50\\% \\text{ to } 60\\%}", "50\\%", False, "ambiguous"),
        ("The answer is 3-4 hours.", "3", False, "ambiguous"),
    ],
    # A second number or an operator after the number, once read as a "unit".
    "operator_tail": [
        ("The answer is 18 plus 1.", "18", False, "ambiguous"),
        ("\\boxed{18 plus 1}", "18", False, "ambiguous"),
        ("\\boxed{18 times 3}", "18", False, "ambiguous"),
        ("\\boxed{18 not 19}", "18", False, "ambiguous"),
        ("The answer is 18 minus 2.", "18", False, "ambiguous"),
        ("\\boxed{18 \\text{ and } 19}", "18", False, "ambiguous"),
        ("\\boxed{18 + 1}", "18", False, "ambiguous"),
        ("\\boxed{18 \\times 3}", "54", False, "ambiguous"),
        ("\\boxed{18 apples 19 pears}", "18", False, "ambiguous"),
        ("The answer is 18 apples and 19 pears.", "18", False, "ambiguous"),
        ("\\boxed{18 \\text{ dollars plus } 2 \\text{ dollars}}", "18", False, "ambiguous"),
        ("#### 18 times 2", "18", False, "ambiguous"),
    ],
    # Two different final-answer statements in one response (boxes, "the answer is",
    # "X is the answer", "#### X"); the same value stated twice is fine.
    "two_final_answers": [
        (
            "Ana has 14 books and buys 3 more. The answer is 14 + 3 = 17.\n"
            "She lends one to Ben, so she has a total of 13 + 3 = 16 books remaining, "
            "which is the answer.",
            "17",
            False,
            "ambiguous",
        ),
        (
            "Ana has 14 books and buys 3 more. The answer is 14 + 3 = 17.\n"
            "She lends one to Ben, so she has a total of 13 + 3 = 16 books remaining, "
            "which is the answer.",
            "16",
            False,
            "ambiguous",
        ),
        ("The answer is 5. Wait, no. The answer is 6.", "6", False, "ambiguous"),
        ("First \\boxed{3}, then \\boxed{4}.", "4", False, "ambiguous"),
        ("#### 16\nThe answer is 17.", "16", False, "ambiguous"),
        ("The answer is $17$.\n\nSo the final answer is \\boxed{16}.", "16", False, "ambiguous"),
        ("\\boxed{17}\n\nSo 16 is the answer.", "17", False, "ambiguous"),
        (
            "She spends $5 + 3 = 8$ dollars, which is the answer. The answer is 9.",
            "9",
            False,
            "ambiguous",
        ),
        ("We add 9 and 9, so 18 is the answer.", "18", True, "equal"),
        ("The answer is 18. Checking: 9 + 9 = 18, so 18 is the answer.", "18", True, "equal"),
        ("\\boxed{\\frac{1}{2}}. The answer is 0.5.", "0.5", True, "equal"),
        ("The answer is 18.\n#### 18", "18", True, "equal"),
        (
            "If the answer is 15, the total would be 45, which is too many. So the answer is 17.",
            "17",
            True,
            "equal",
        ),
        ("Step 1: 4 + 5 = 9. Step 2: 9 * 2 = 18. The answer is 18.", "18", True, "equal"),
        ("Therefore, $x = 5$ is the answer.", "5", True, "equal"),
        ("So $11,\\! 111,\\! 100$ is the answer.", "11,\\! 111,\\! 100", True, "equal"),
        ("So $5x - 7y + 11z + 4 = 0$ is the answer.", "5x - 7y + 11z + 4 = 0", True, "equal"),
    ],
    # The hedge opens the next sentence or line, after a complete final answer.
    "hedge_next_sentence": [
        ("The answer is 18. Or 19.", "18", False, "ambiguous"),
        ("The answer is 18. Or maybe 19.", "18", False, "ambiguous"),
        ("The answer is 18; or 19.", "18", False, "ambiguous"),
        ("The answer is 18.\n\nOr perhaps 19.", "18", False, "ambiguous"),
        ("\\boxed{18}. Or 19.", "18", False, "ambiguous"),
        ("\\boxed{18}\nor 19", "18", False, "ambiguous"),
        ("#### 18\nor 19", "18", False, "ambiguous"),
        ("So 18 is the answer. Or 19.", "18", False, "ambiguous"),
        ("The answer is **18**. Or **19**.", "18", False, "ambiguous"),
        ("The answer is $\\$18.90$. Or $\\$19$.", "\\$18.90", False, "ambiguous"),
        ("The answer is 18. Or, said another way, eighteen.", "18", True, "equal"),
        ("The answer is 18. Originally 19 were there.", "18", True, "equal"),
        ("The answer is 18.\nOrder 19 more next time.", "18", True, "equal"),
    ],
    # Base subscripts compare by value: 52_8 is 42, a bare number is base 10.
    "base_subscript": [
        ("\\boxed{52_8}", "52_9", False, "not_equal"),
        ("\\boxed{52}", "52_8", False, "not_equal"),
        ("\\boxed{42}", "52_8", True, "equal"),
        ("\\boxed{101_2}", "5", True, "equal"),
        ("The answer is $52_8$.", "52_8", True, "equal"),
        ("\\boxed{52_{8}}", "42", True, "equal"),
        ("\\boxed{1A_{16}}", "26", True, "equal"),
        ("\\boxed{19_8}", "17", False, "not_equal"),  # 9 is no base-8 digit
        ("\\boxed{19_8}", "19", False, "not_equal"),
        ("\\boxed{52_{10}}", "52", True, "equal"),
        ("\\boxed{4210_{5}}", "555", True, "equal"),
        ("\\boxed{1011_2}", "1101_2", False, "not_equal"),
    ],
    # A dollar sign escaped inside a math span: `$\$18.90$`.
    "dollar_in_math": [
        ("The final answer is $\\$18.90$.", "\\$18.90", True, "equal"),
        ("The answer is $\\$5$.", "5", True, "equal"),
        ("The answer is $\\$1,000$.", "1000", True, "equal"),
        ("So the answer is $\\$32,\\!348$.", "\\$32,\\!348", True, "equal"),
        ("The answer is $\\$18.90$.", "18.9", True, "equal"),
        ("The answer is $\\$19.90$.", "\\$18.90", False, "not_equal"),
        ("The answer is $\\$18$ per box.", "18", True, "equal"),
    ],
    # Control: honest forms that must keep passing (and one honest wrong answer).
    "honest": [
        ("The answer is 18.", "18", True, "equal"),
        ("\\boxed{18}", "18", True, "equal"),
        ("The answer is $18.", "18", True, "equal"),
        ("The answer is 18 apples.", "18", True, "equal"),
        ("\\boxed{18 \\text{ cm}^2}", "18", True, "equal"),
        ("\\boxed{18 cm^2}", "18", True, "equal"),
        ("\\boxed{\\frac{1}{2}}", "0.5", True, "equal"),
        ("The answer is 0.5.", "\\frac{1}{2}", True, "equal"),
        ("#### 1,000", "1000", True, "equal"),
        ("\\boxed{\\$18.90}", "18.9", True, "equal"),
        ("The answer is 50%.", "50", True, "equal"),
        ("\\boxed{50\\%}", "0.5", True, "equal"),
        ("The answer is -3.", "-3", True, "equal"),
        ("\\boxed{-\\frac{3}{4}}", "-0.75", True, "equal"),
        ("\\boxed{\\sqrt{2}}", "\\sqrt{2}", True, "equal"),
        ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", True, "equal"),
        ("\\boxed{(3, 4]}", "(3,4]", True, "equal"),
        ("\\boxed{(1, -2)}", "(1,-2)", True, "equal"),
        ("\\boxed{1, -2}", "1,-2", True, "equal"),
        ("\\boxed{1 \\pm \\sqrt{19}}", "1 \\pm \\sqrt{19}", True, "equal"),
        ("\\boxed{5 \\times 10^3}", "5000", True, "equal"),
        ("\\boxed{2^{10}}", "1024", True, "equal"),
        ("The answer is 42 apples because she had 6 bags of 7.", "42", True, "equal"),
        ("The answer is 42, since 6 * 7 = 42.", "42", True, "equal"),
        ("The answer is 14 + 3 = 17.", "17", True, "equal"),
        ("\\boxed{864 \\mbox{ inches}^3}", "864 \\mbox{ inches}^2", True, "equal"),
        ("\\boxed{x = 5}", "5", True, "equal"),
        ("\\boxed{\\frac{270}{7}\\text{ degrees}}", "\\frac{270}7\\text{ degrees}", True, "equal"),
        ("\\boxed{(-\\infty, 0]}", "(-\\infty, 0]", True, "equal"),
        ("The answer is 18 dollars each.", "18", True, "equal"),
        ("The answer is 50% or 0.5.", "50", True, "equal"),  # one value, two spellings
        ("The answer is 1/2, or 0.5.", "0.5", True, "equal"),
        ("The answer is 8, and 8 + 2 = 10 is the total.", "8", True, "equal"),
        ("The answer is 15 minutes, not 20 minutes.", "15", True, "equal"),
        # GSM8K-style working: calculator notes, "points/answer = ...", a calculation with units
        (
            "She got 20 right at 3 points/answer = <<20*3=60>>60 points, and 6 more.\n#### 66",
            "66",
            True,
            "equal",
        ),
        (
            "She makes 7200 / 480 = <<7200/480=15>>15 gallons, so the final answer is "
            "15 gallons * 8 pints / gallon = <<15*8=120>>120 pints\n#### 120",
            "120",
            True,
            "equal",
        ),
        ("The answer is <<6=6>>6.\n#### 6", "6", True, "equal"),
        # Competition-math working: a check after the answer, display math after "answer:"
        (
            "Therefore $7^{-1} \\equiv \\boxed{2} \\pmod{13}$.\n\n"
            "We may check our answer: $7 \\cdot 2 = 14 \\equiv 1 \\pmod{13}$.",
            "2",
            True,
            "equal",
        ),
        ("Using this, we get our answer: \\[\n3 \\cdot 4 = \\boxed{12}.\\]", "12", True, "equal"),
        ("The answer is 19.", "18", False, "not_equal"),
    ],
}

CASES = [
    pytest.param(*case, id=f"{name}-{i}")
    for name, cases in CORPUS.items()
    for i, case in enumerate(cases)
]


@pytest.mark.parametrize(("response", "reference", "credited", "reason"), CASES)
def test_adversarial_corpus(response: str, reference: str, credited: bool, reason: str) -> None:
    verdict = verify_math(response, reference)
    assert (verdict.correct, verdict.reason) == (credited, reason), verdict


def test_corpus_size() -> None:
    """At least 60 cases, each attack class with both kinds of verdict or a control."""
    assert sum(len(cases) for cases in CORPUS.values()) >= 60
    for name, cases in CORPUS.items():
        assert len(cases) >= 5, name
        assert len({c[:2] for c in cases}) == len(cases), f"{name}: duplicate case"
