"""Answer extraction and scoring for GSM8K and MATH: ``extract_answer(_with_rule)`` and ``is_correct``.

About 450 lines, kept in one module on purpose: every rule below and every equivalence guard decides together
whether one completion is right, and each guard exists because of a rule (docs/evaluation.md); split, a change to
one would be made without the others in view.

The answer of a completion is read by the first of these rules (``RULES``) that finds one; records name the rule:

1. ``marker``: the rest of the line after the last "The answer is:" (MetaMath's convention; the colon is required,
   so prose such as "the answer is a multiple of 3" is not read).
2. ``boxed``: the content of the last ``\\boxed{}`` (or ``\\fbox{}``), braces matched. A box written after the last
   marker wins over it: it is the later, final answer.
3. ``final-answer``: Minerva's "Final Answer: The final answer is $X$. I hope it is correct." (also "**Final
   Answer:** X"): the rest of that line, else the next non-empty one.
4. ``answer-heading``: PRM800K's "# Answer" line (also "## Final Answer", "**Answer**"): the next non-empty line.
5. ``hashes``: "#### X" (GSM8K's own solutions; also at a line's end, "... meeting. #### 9"), the last one, unless it
   is a Markdown heading ("#### Step 2").
6. ``answer-is``: "The answer is $X$." or "the final answer is X" without a colon, only where that sentence ends the
   completion (a closing "I hope it is correct." aside) and X does not start with two words (prose).
7. ``fallback`` (GSM8K only): the number of the final statement, the last sentence with a number: after its last
   "=" if it has one, else the first of its numbers computed earlier (after an "="), else its last number.

Answers not in a box are cleaned alike: math delimiters (``$``, ``$$``, ``\\(\\)``, ``\\[\\]``), bold and a closing
period or comma are removed, also inside the delimiters (``$(2, -1, 2).$`` reads ``(2, -1, 2)``).

GSM8K compares numbers exactly (as fractions): thousands separators, signs, decimals, fractions (``3/4``,
``\\frac{3}{4}``), currency and percent signs and trailing units are handled, so "$1,234,567.00 dollars" is 1234567.
MATH decides equivalence with math-verify (symbolic: "2x+1" equals "1+2x", "0.5" equals "\\frac12", intervals,
sets, matrices); when it cannot parse an answer, or does not find the two equal, the MATH authors' normalised string
comparison (``metamath.is_equiv``) still accepts answers that are the same once normalised (units and "x =" prefixes
removed, for example). Answers are rewritten around math-verify's known misreadings first (``_for_math_verify``:
a factor written after an integer is added to it, as in ``2\\binom{4}{2}`` or ``2(3)``; a final variable named like
a unit is dropped; plain-text "pi" is read p*i), and where ``i`` is the only symbol they are also compared as complex
numbers. MATH scoring must run on the main thread (math-verify's timeouts are signals). ``tucka_llm.eval.metamath``
reproduces MetaMath's own scoring for comparison.
"""

from __future__ import annotations

import cmath
import math
import re
import threading
from collections import deque
from fractions import Fraction
from typing import NamedTuple

from tucka_llm.eval import metamath

TASKS = ("gsm8k", "math")
_MARKER = re.compile(r"The answer is\s*:", re.IGNORECASE)  # with its colon: "the answer is a multiple of" is prose
_FINAL_ANSWER = re.compile(r"final answer(?:\*\*)?\s*:(?:\*\*)?", re.IGNORECASE)  # also "**Final Answer:**"
_FINAL_ANSWER_IS = re.compile(r"(?:the\s+)?final\s+answer\s+is\b\s*:?", re.IGNORECASE)
_HOPE = re.compile(r"I hope it is correct", re.IGNORECASE)  # Minerva's closing sentence
# [^\S\n]: a space on the same line. Quantified spaces are never next to another quantifier that also takes spaces.
# "# Answer", "## Final Answer", "**Answer**" at the start of a line; the rest of the line is checked in Python.
_HEADING = re.compile(r"^[^\S\n]*(?:#{1,6}[^\S\n]*|\*\*)(?:final[^\S\n]+)?answer\b", re.I | re.M)
# At a line's start, or after a space within a line: Abel's "Thus, there are 9 boys at the meeting. #### 9".
_HASHES = re.compile(r"(?:^[^\S\n]*|(?<=[^\S\n]))####(?!#)[^\S\n]*(\S[^\n]*)", re.MULTILINE)
_ANSWER_LABEL = re.compile(r"(?:final\s+)?answer\b\s*:?", re.IGNORECASE)
_ANSWER_IS = re.compile(r"\bthe\s+(?:final\s+)?answer\s+is\b", re.IGNORECASE)
_WORD = re.compile(r"[A-Za-z]{2,}")  # an answer that starts with a word is a heading ("#### Step 2")
_PROSE = re.compile(r"[A-Za-z]+\s+[A-Za-z]{2,}")  # two words: "a multiple of 3", "not an integer"
_SENTENCE_END = re.compile(r"(?<!\\)[.!?]\s")  # not LaTeX's "\!" (a negative space: "11,\! 111")
_NON_SPACE = re.compile(r"\S")
_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**"))
# A number: sign, digits with or without thousands separators, decimals, optionally "/ denominator".
# (The lookahead lets the regex engine skip text that cannot start a number fast: a megabyte of prose in 0.1 s.)
_NUMBER_PATTERN = r"(?=[-+.\d])(?:[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|[-+]?\.\d+)"
_NUMBER = re.compile(_NUMBER_PATTERN)
_STATEMENT_CHARS = 1000  # a "sentence" longer than this is not prose: its last numbers are enough
_RESULT = re.compile(rf"=\s*({_NUMBER_PATTERN})")  # the result of a computation
# Each quantifier is followed by something it cannot match, so no regex here backtracks more than linearly (a lazy
# "\s*([^{}]+?)\s*" took minutes on "\frac{" and 8,000 spaces); the groups are stripped in ``_plain`` instead.
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]+)\}\s*\{([^{}]+)\}")
# "\text{...}" with one level of braces inside; "[^}]*" would rescan to the end from every unclosed "\text{".
_TEXT_OR_SIGN = re.compile(r"\\?[$%]|\\text\{(?:[^{}]|\{[^{}]*\})*\}")
# MATH's longest gold answer has 81 characters; sympy spends seconds on some strings of a few hundred.
_MAX_MATH_VERIFY_CHARS = 500
_TIMEOUT_SECONDS = 5  # math-verify's own default for each parse and comparison
_MAX_DIGITS = 10_000  # a power naming a larger number is not handed to sympy (``_too_large``)
_MAX_FACTORIAL = 3_000  # nor a factorial of a larger number (3000! has 9,131 digits)
# Where latex2sympy2_extended's mixed-number rule ("2\frac{1}{2}" = 5/2) also adds an integer to the integer-valued
# factor after it: "2\binom{4}{2}" (8), "\binom{30}{3}\binom{20}{2}" (4250), "2(3)" (5), "3\left(\frac12\right)" (7/2).
_IMPLICIT_PRODUCT = re.compile(r"(?<=[\d})!])\s*(?=\\[dt]?binom\b)|(?<=[\d)])\s*(?=\(|\\left\()")
_UNIT_LETTERS = frozenset("cdghlmost")  # the one-letter units latex2sympy2_extended 1.11.0 removes from an answer's end
_PI_WORD = re.compile(r"(?<![\\A-Za-z])pi(?![A-Za-z])")  # "pi" written as a word, not "\pi" or "pin"


class Extraction(NamedTuple):
    """The answer a completion states and the rule that read it (one of ``RULES``); both None when none did."""

    answer: str | None
    rule: str | None


def extract_answer(text: str, task: str) -> str | None:
    """The final answer written in ``text`` (a completion), as a string; None when there is none."""
    return extract_answer_with_rule(text, task).answer


def extract_answer_with_rule(text: str, task: str) -> Extraction:
    """The final answer written in ``text`` and the rule that read it: the first of ``RULES`` that finds one."""
    _check_task(task)
    marker = _last(_MARKER, text)
    boxed_at = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if marker and boxed_at < marker.start():  # a \boxed{} written after the marker is the later answer
        answer = _clean(_first_line(text, marker.end()))
        if answer:
            return Extraction(answer, "marker")
    boxed = metamath.last_boxed(text)
    if boxed and _boxed_content(boxed):
        return Extraction(_boxed_content(boxed), "boxed")
    for rule, read in _LATER_RULES:
        answer = read(text)
        if answer:
            return Extraction(answer, rule)
    if task == "gsm8k":
        answer = _final_statement_number(text)
        if answer:
            return Extraction(answer, "fallback")
    return Extraction(None, None)


def _final_answer(text: str) -> str | None:
    """Minerva's "Final Answer: The final answer is $X$. I hope it is correct." (also "**Final Answer:** X")."""
    found = _last(_FINAL_ANSWER, text)
    if found is None:
        return None
    line = _first_line(text, found.end())
    prefix = _FINAL_ANSWER_IS.match(line)
    line = line[prefix.end() :] if prefix else line
    hope = _HOPE.search(line)
    return _clean(line[: hope.start()] if hope else line) or None


def _answer_heading(text: str) -> str | None:
    """PRM800K's "# Answer" heading (also "## Final Answer", "**Answer:**"): the answer is the next non-empty line."""
    found = _last(_HEADING, text)
    if found is None:
        return None
    end = text.find("\n", found.end())
    if end < 0 or text[found.end() : end].strip(" \t\r*:"):  # no next line, or not a heading ("# Answer the call")
        return None
    return _clean(_first_line(text, end)) or None


def _hashes(text: str) -> str | None:
    """GSM8K's "#### X" on the last such line; "#### Step 2: ..." is a Markdown heading, not an answer."""
    found = _last(_HASHES, text)
    if found is None:
        return None
    label = _ANSWER_LABEL.match(found[1])  # "#### Answer: 5"
    answer = _clean(found[1][label.end() :] if label else found[1])
    return None if not answer or _WORD.match(answer) else answer


def _answer_is(text: str) -> str | None:
    """ "The answer is $X$." or "the final answer is X" without a colon, only as the completion's last sentence.

    Without the colon "the answer is" is often prose ("the answer is a multiple of 3, so ..."): the statement must
    end the completion (a closing "I hope it is correct." aside) and must not start with two words."""
    found = _last(_ANSWER_IS, text)
    if found is None:
        return None
    rest = text[found.end() :].strip()
    hope = _HOPE.search(rest)
    if hope and not rest[hope.end() :].strip(" .\n"):
        rest = rest[: hope.start()]
    answer = _clean(rest.removeprefix(":"))
    if not answer or "\n" in answer or _SENTENCE_END.search(answer) or _PROSE.match(answer):
        return None
    return answer


def _final_statement_number(text: str) -> str | None:
    """GSM8K without a marked answer: the number of the final statement (the last sentence with a number).

    A computation states its result after its last "="; closing prose ("5 cars drove through the traffic jam in the
    first 15 minutes.") also repeats numbers of the question, so of several, the first one computed earlier in the
    text (written after an "=") is taken, else the last one. Without their "####" line, the 8,792 GSM8K solutions
    read wrong 68 times this way, 246 times with the last number of the text."""
    plain = _plain(text)
    last_digit = max(plain.rfind(digit) for digit in "0123456789")  # found from the end: no scan of every number
    if last_digit < 0:
        return None
    line_start = plain.rfind("\n", 0, last_digit) + 1
    line_end = plain.find("\n", last_digit)
    line = plain[line_start : line_end if line_end >= 0 else len(plain)]
    sentence_end = _last(_SENTENCE_END, line[: last_digit - line_start])
    start = max(sentence_end.end() if sentence_end else 0, last_digit - line_start - _STATEMENT_CHARS)
    statement = line[start:]
    if "=" in statement:
        result = _NUMBER.search(statement.rsplit("=", 1)[1])
        if result:
            return result.group().strip()
    numbers = [number.strip() for number in _NUMBER.findall(statement)]
    if len(numbers) > 1:
        computed = {_canonical(found[1]) for found in _RESULT.finditer(plain)}
        numbers = [number for number in numbers if _canonical(number) in computed][:1] or numbers
    return numbers[-1] if numbers else None


def _canonical(number: str) -> str:
    """A number as written, for comparing: "1,234.50" -> "1234.5"."""
    number = number.replace(",", "").replace(" ", "").lstrip("+")
    return number.rstrip("0").rstrip(".") if "." in number and "/" not in number else number


_LATER_RULES = (
    ("final-answer", _final_answer),
    ("answer-heading", _answer_heading),
    ("hashes", _hashes),
    ("answer-is", _answer_is),
)
RULES = ("marker", "boxed", *(rule for rule, _ in _LATER_RULES), "fallback")


def is_correct(completion: str, gold: str, task: str) -> bool:
    """Whether ``completion``'s answer equals ``gold`` (GSM8K: the number after "####"; MATH: the answer string).

    MATH scoring must run on the main thread (see ``answers_equivalent``); GSM8K scoring runs anywhere."""
    if task == "math":
        _check_main_thread()
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
    """MATH answers: equal for math-verify, or equal once normalised the MATH authors' way.

    Main thread only: math-verify bounds every parse and comparison with SIGALRM (5 s), which only the main thread
    can receive, and an answer as short as ``10^{10^{10}}`` never finishes comparing without it."""
    _check_main_thread()
    return _math_verify_equal(predicted, gold) or metamath.is_equiv(predicted, gold)


def _math_verify_equal(predicted: str, gold: str) -> bool:
    """Equal for math-verify, around its known misreadings (``_for_math_verify``, ``_complex_equal``).

    Answers too long, or naming numbers too large for sympy to handle in well under a second (``_too_large``), are
    not handed to it: they are equal only as normalised strings (``metamath.is_equiv``, the caller's fallback)."""
    if max(len(predicted), len(gold)) > _MAX_MATH_VERIFY_CHARS or _too_large(predicted) or _too_large(gold):
        return False
    from math_verify import parse, verify  # imported here: sympy's import costs a second

    parsed_gold = parse(f"${_for_math_verify(gold)}$")
    parsed_predicted = parse(f"${_for_math_verify(predicted)}$")
    if not (parsed_gold and parsed_predicted):
        return False
    return verify(parsed_gold, parsed_predicted) or _complex_equal(parsed_gold[0], parsed_predicted[0])


def _too_large(answer: str) -> bool:
    """Whether ``answer`` names a number with more than ``_MAX_DIGITS`` digits: a power whose exponent (a number or a
    tower of numbers, ``10^{10^{10}}``) is that large, or a factorial of a number (or tower) above ``_MAX_FACTORIAL``.

    sympy evaluates such numbers exactly, for minutes (``(10^{10})!``, ``i^{10^{10^{10}}}``), where math-verify's
    timeout cuts it after 5 s: each answer would cost 5 s. MATH's answers name no number of even 1,000 digits."""
    powers = (_log10_tower(exponent) > math.log10(_MAX_DIGITS) for exponent in _exponents(answer))
    factorials = (_log10_tower(argument) > math.log10(_MAX_FACTORIAL) for argument in _factorial_arguments(answer))
    return any(powers) or any(factorials)


def _exponents(answer: str) -> list[str]:
    """The exponent of every ``^`` in ``answer``: a braced group (braces matched), else the number or symbol after."""
    found = []
    for caret in (m.start() for m in re.finditer(r"\^", answer)):
        rest = answer[caret + 1 :].lstrip()
        if rest.startswith("{"):
            group = _braced(rest)
            if group is not None:
                found.append(group)
        else:
            token = re.match(r"[-+]?\d+|\\?[A-Za-z]+|.", rest)
            if token:
                found.append(token.group())
    return found


def _factorial_arguments(answer: str) -> list[str]:
    """What each ``!`` applies to: the number, braced group or parenthesised group just before it."""
    found = []
    for bang in (m.start() for m in re.finditer(r"!", answer)):
        before = answer[:bang].rstrip()
        number = re.search(r"\d+$", before)
        if number:
            found.append(number.group())
        elif before.endswith((")", "}")):  # the group that ends there: matched from its end, on the reversed text
            group = _group(before[::-1], before[-1], {")": "(", "}": "{"}[before[-1]])
            if group is not None:
                found.append(group[::-1])
    return found


def _braced(text: str) -> str | None:
    """The content of the brace group ``text`` starts with, braces matched; None if it is not closed."""
    return _group(text, "{", "}")


def _group(text: str, opening: str, closing: str) -> str | None:
    """The content of the group ``text`` starts with (``opening`` ... ``closing``, nested groups matched); None
    if it is not closed."""
    depth = 0
    for index, char in enumerate(text):
        depth += {opening: 1, closing: -1}.get(char, 0)
        if depth == 0:
            return text[1:index]
    return None


def _log10_tower(text: str) -> float:
    """log10 of the value of ``text`` when it is a number or a power tower of numbers (``10^{10^{10}}``, braces and
    parentheses allowed), +inf when that is astronomically large; 0 for anything else (symbols, sums: not large)."""
    text = text.strip().strip("{}()").strip()
    number = re.fullmatch(r"\d+", text)
    if number:
        return math.log10(max(int(text[:300]), 1)) + max(len(text) - 300, 0)
    tower = re.fullmatch(r"\(?\{?(\d+)\}?\)?\s*\^\s*(.+)", text)
    if tower is None:
        return 0.0
    base = math.log10(max(int(tower.group(1)[:300]), 1)) + max(len(tower.group(1)) - 300, 0)
    exponent = _log10_tower(tower.group(2))
    if base == 0:
        return 0.0  # 1^n = 1
    return math.inf if exponent > 300 else base * 10**exponent


def _for_math_verify(answer: str) -> str:
    """``answer`` rewritten around misreadings of math-verify 0.9.0 / latex2sympy2_extended 1.11.0 (reproductions in
    docs/evaluation.md); the rewritten answer means the same, so this stays right once they are fixed."""
    answer = _IMPLICIT_PRODUCT.sub(r"\\cdot ", answer)  # 2\binom{4}{2} is read 2 + 6: make the product explicit
    answer = _PI_WORD.sub(r"\\pi", answer)  # plain-text 12*pi is read 12*p*i
    return _protect_trailing_variable(answer)


def _protect_trailing_variable(answer: str) -> str:
    """``\\frac{8}{3}t`` -> ``\\frac{8}{3}(t)``, ``2x + h`` -> ``2x + (h)``: latex2sympy2_extended drops a final
    letter that is also a unit ("t" tonnes, "h" hours, "m" metres) after a digit, a brace or a space, even where it is a
    variable. In parentheses it stays one. Protected only when glued to a number, brace or parenthesis, or after an
    operator or comma: "5 m" keeps its unit."""
    answer = answer.rstrip()
    if len(answer) < 2 or answer[-1] not in _UNIT_LETTERS:
        return answer
    before = answer[:-1]
    glued = before[-1] in "0123456789})"
    after_operator = before.rstrip().endswith(("+", "-", "*", "/", "=", "^", "(", ",", "\\cdot", "\\times"))
    return f"{before}({answer[-1]})" if glued or after_operator else answer


def _complex_equal(gold: object, predicted: object) -> bool:
    """Equal with ``i`` the imaginary unit, where ``i`` is the only symbol of both (math-verify keeps it a variable,
    so 1+2i and i(2-i) differ for it). Compared numerically, to 1e-9 relative, within math-verify's 5 s timeout."""
    import sympy
    from math_verify.errors import TimeoutException
    from math_verify.utils import timeout

    if not (isinstance(gold, sympy.Expr) and isinstance(predicted, sympy.Expr)):
        return False
    symbols = gold.free_symbols | predicted.free_symbols  # each parse makes its own Symbol("i")
    if {symbol.name for symbol in symbols} != {"i"}:
        return False

    def value(expression: sympy.Expr) -> complex:
        return complex(sympy.N(expression.subs({symbol: sympy.I for symbol in symbols})))

    try:
        first, second = timeout(_TIMEOUT_SECONDS)(lambda: (value(gold), value(predicted)))()
    except (TypeError, ValueError, OverflowError, TimeoutException):
        return False
    if not (cmath.isfinite(first) and cmath.isfinite(second)):  # inf - inf is nan, but inf <= inf: never equal
        return False
    return abs(first - second) <= 1e-9 * max(1.0, abs(first), abs(second))


def _check_main_thread() -> None:
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "MATH scoring (is_correct(..., 'math'), answers_equivalent) must run on the main thread: math-verify "
            "bounds each comparison with SIGALRM, which only the main thread receives, and without it answers such "
            "as 10^{10^{10}} never finish. Score in the main thread, or in worker processes."
        )


def _plain(text: str) -> str:
    """Numbers in ``text`` written plainly: LaTeX fractions as a/b, no currency, percent or math-mode marks."""
    text = text.replace("\u2212", "-").replace("\\!", "").replace("\\,", "")
    text = _LATEX_FRAC.sub(lambda m: f"({m[1].strip()})/({m[2].strip()})", text).replace("(", "").replace(")", "")
    return _TEXT_OR_SIGN.sub(" ", text)


def _boxed_content(boxed: str) -> str | None:
    if boxed.startswith("\\boxed{") or boxed.startswith("\\fbox{"):
        return boxed[boxed.index("{") + 1 : -1].strip() or None
    return None


def _clean(answer: str) -> str:
    """The answer alone: ``$(2, -1, 2).$`` -> ``(2, -1, 2)``, without math delimiters, bold or a closing period/comma.

    Each kind of delimiter is removed at most once (only when it does not occur inside), so this is linear."""
    answer = answer.strip()
    while True:
        before = answer
        answer = answer.rstrip(" .,").strip()
        for opening, closing in _DELIMITERS:
            if len(answer) >= len(opening) + len(closing) and answer.startswith(opening) and answer.endswith(closing):
                inner = answer[len(opening) : -len(closing)]
                unescaped = inner.replace("\\$", "")  # "$\$18.90.$": a dollar sign inside the math
                if opening not in unescaped and closing not in unescaped:
                    answer = inner.strip()
        if answer == before:
            return answer


def _first_line(text: str, start: int) -> str:
    """The rest of the line at ``start`` if it holds any text, else the next non-empty line."""
    found = _NON_SPACE.search(text, start)
    if found is None:
        return ""
    end = text.find("\n", found.start())
    return text[found.start() : end if end >= 0 else len(text)].strip()


def _last(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    last = deque(pattern.finditer(text), maxlen=1)
    return last[0] if last else None


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}: use one of {', '.join(TASKS)}.")
