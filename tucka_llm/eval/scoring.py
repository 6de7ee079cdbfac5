"""Answer extraction and scoring for GSM8K and MATH: ``extract_answer`` and ``is_correct``.

The answer of a completion is what follows the last "The answer is:" (MetaMath's convention; the rest of that line,
its boxed content if boxed), else the content of the last ``\\boxed{}``, else (GSM8K only) the last number in the
text. A ``\\boxed{}`` written after the last marker wins over it: it is the later, final answer.

GSM8K compares numbers exactly (as fractions): thousands separators, signs, decimals, fractions (``3/4``,
``\\frac{3}{4}``), currency and percent signs and trailing units are handled, so "$1,234,567.00 dollars" is 1234567.
MATH decides equivalence with math-verify (symbolic: "2x+1" equals "1+2x", "0.5" equals "\\frac12", intervals,
sets, matrices); when it cannot parse an answer, or does not find the two equal, the MATH authors' normalised string
comparison (``metamath.is_equiv``) still accepts answers that are the same once normalised (units and "x =" prefixes
removed, for example). ``tucka_llm.eval.metamath`` reproduces MetaMath's own scoring for comparison.
"""

from __future__ import annotations

import re
from fractions import Fraction

from tucka_llm.eval import metamath

TASKS = ("gsm8k", "math")
_MARKER = re.compile(r"The answer is\s*:", re.IGNORECASE)  # with its colon: "the answer is a multiple of" is prose
# A number: sign, digits with or without thousands separators, decimals, optionally "/ denominator".
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|[-+]?\.\d+")
# Each quantifier is followed by something it cannot match, so no regex here backtracks more than linearly (a lazy
# "\s*([^{}]+?)\s*" took minutes on "\frac{" and 8,000 spaces); the groups are stripped in ``_plain`` instead.
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]+)\}\s*\{([^{}]+)\}")
# "\text{...}" with one level of braces inside; "[^}]*" would rescan to the end from every unclosed "\text{".
_TEXT_OR_SIGN = re.compile(r"\\?[$%]|\\text\{(?:[^{}]|\{[^{}]*\})*\}")


def extract_answer(text: str, task: str) -> str | None:
    """The final answer written in ``text`` (a completion), as a string; None when there is none."""
    _check_task(task)
    markers = list(_MARKER.finditer(text))
    boxed_at = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if markers and boxed_at < markers[-1].start():  # a \boxed{} written after the marker is the later answer
        line = text[markers[-1].end() :].strip().split("\n", 1)[0]
        answer = _strip_sentence(line)
        if answer:
            return answer
    boxed = metamath.last_boxed(text)
    if boxed and _boxed_content(boxed):
        return _boxed_content(boxed)
    if task == "gsm8k":
        numbers = _NUMBER.findall(_plain(text))
        return numbers[-1].strip() if numbers else None
    return None


def is_correct(completion: str, gold: str, task: str) -> bool:
    """Whether ``completion``'s answer equals ``gold`` (GSM8K: the number after "####"; MATH: the answer string)."""
    predicted = extract_answer(completion, task)
    if predicted is None:
        return False
    if task == "gsm8k":
        value = parse_number(predicted)
        return value is not None and value == parse_number(gold)
    return answers_equivalent(predicted, gold)


def parse_number(text: str) -> Fraction | None:
    """The number ``text`` states (its last one after an "="), exactly; None if it states none."""
    plain = _plain(text)
    if "=" in plain:
        plain = plain.rsplit("=", 1)[1]
    match = _NUMBER.search(plain)
    if match is None:
        return None
    number = match.group().replace(",", "").replace(" ", "")
    try:
        return Fraction(number)
    except (ValueError, ZeroDivisionError):
        return None


def answers_equivalent(predicted: str, gold: str) -> bool:
    """MATH answers: equal for math-verify, or equal once normalised the MATH authors' way."""
    return _math_verify_equal(predicted, gold) or metamath.is_equiv(predicted, gold)


def _math_verify_equal(predicted: str, gold: str) -> bool:
    from math_verify import parse, verify  # imported here: sympy's import costs a second

    parsed_gold, parsed_predicted = parse(f"${gold}$"), parse(f"${predicted}$")
    return bool(parsed_gold and parsed_predicted and verify(parsed_gold, parsed_predicted))


def _plain(text: str) -> str:
    """Numbers in ``text`` written plainly: LaTeX fractions as a/b, no currency, percent or math-mode marks."""
    text = text.replace("\u2212", "-").replace("\\!", "").replace("\\,", "")
    text = _LATEX_FRAC.sub(lambda m: f"({m[1].strip()})/({m[2].strip()})", text).replace("(", "").replace(")", "")
    return _TEXT_OR_SIGN.sub(" ", text)


def _boxed_content(boxed: str) -> str | None:
    if boxed.startswith("\\boxed{") or boxed.startswith("\\fbox{"):
        return boxed[boxed.index("{") + 1 : -1].strip() or None
    return None


def _strip_sentence(answer: str) -> str:
    """ "$\\frac{1}{2}$." -> "\\frac{1}{2}": the sentence's final period and math-mode dollars removed."""
    answer = answer.strip().rstrip(".").strip()
    if len(answer) > 1 and answer.startswith("$") and answer.endswith("$"):
        answer = answer.strip("$").strip()
    return answer


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}: use one of {', '.join(TASKS)}.")
