"""MetaMath's scoring, reproduced exactly (``--compat metamath``), and the MATH answer normalisation it uses.

MetaMath's eval_gsm8k.py and eval_math.py (the anchors of the paper's table) score this way; published numbers are
comparable only with it. Its defects are kept on purpose here: the GSM8K number pattern reads "1,234,567" as 1234
and rounds decimals to integers; MATH answers are compared as normalised strings only, so "0.5" and "\\frac12" are
equal but "2x+1" and "1+2x" are not. ``tucka_llm.eval.scoring`` is the project's own, corrected scoring.

Written from the behaviour of MetaMath's scripts and of the MATH authors' ``is_equiv`` (Hendrycks et al., 2021).
"""

from __future__ import annotations

import re
import unicodedata
from fractions import Fraction  # MetaMath imports the PyPI package "fraction"; same value for "a/b"

ANSWER_MARKER = "The answer is: "
_GSM8K_NUMBER = re.compile(r"[\-+]?\d*[\.,/]?\d+")  # one separator at most: "1,234,567" -> "1,234"


def gsm8k_answer(completion: str) -> int | None:
    """MetaMath's GSM8K prediction: the first number after the last "The answer is: ", rounded to an integer."""
    parts = completion.split(ANSWER_MARKER)
    if len(parts) < 2:
        return None
    match = _GSM8K_NUMBER.search(parts[-1].strip())
    if match is None:
        return None
    text = match.group()
    if "/" in text:
        numerator, denominator = text.split("/")
        if not (_is_number(numerator) and _is_number(denominator)):
            return None
        if denominator == "0":
            return round(float(numerator.replace(",", "")))
        return round(float(Fraction(text.replace(",", ""))))
    value = float(text.replace(",", ""))
    return None if value == float("inf") else round(value)


def gsm8k_correct(completion: str, gold: str) -> bool:
    """MetaMath's GSM8K verdict against the gold answer (the text after "#### ", commas allowed)."""
    predicted = gsm8k_answer(completion)
    return predicted is not None and float(predicted) == float(int(gold.replace(",", "")))


def math_answer(completion: str) -> str | None:
    """MetaMath's MATH prediction: the rest of the line after the last "The answer is: ", final period removed."""
    parts = completion.split(ANSWER_MARKER)
    if len(parts) < 2:
        return None
    answer = parts[-1].split(".\n")[0].strip()
    if answer.endswith("."):
        answer = answer[:-1]
    return answer.strip()


def math_correct(completion: str, gold: str | None) -> bool:
    """MetaMath's MATH verdict: no answer marker is wrong; else normalised string equality with the gold answer."""
    predicted = math_answer(completion)
    return predicted is not None and is_equiv(predicted, gold)


def last_boxed(text: str) -> str | None:
    """The last ``\\boxed...`` (else ``\\fbox...``) group of ``text`` with its braces, or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    return None


def remove_boxed(boxed: str | None) -> str | None:
    """``\\boxed{x}`` -> ``x``; anything else (``\\boxed x``, ``\\fbox{x}``, None) -> None, as in MetaMath."""
    if boxed is None or not boxed.startswith("\\boxed{") or not boxed.endswith("}"):
        return None
    return boxed[len("\\boxed{") : -1]


def is_equiv(first: str | None, second: str | None) -> bool:
    """Equal after ``normalise``; if normalising either raises, equal as raw strings (the MATH authors' rule)."""
    if first is None or second is None:
        return first is None and second is None
    try:
        return normalise(first) == normalise(second)
    except Exception:  # the original catches everything here too
        return first == second


def normalise(answer: str) -> str:
    """The MATH authors' answer normalisation (MetaMath's ``strip_string``); raises on a few malformed inputs."""
    s = answer.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    if "\\text{ " in s:  # units on the right: "5 \\text{ cm}" -> "5 "
        parts = s.split("\\text{ ")
        if len(parts) != 2:
            raise AssertionError("more than one unit")
        s = parts[0]
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    if len(s.split("=")) == 2 and len(s.split("=")[0]) <= 2:  # "k = 5" -> " 5"
        s = s.split("=")[1]
    s = _fix_sqrt(s).replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def _fix_sqrt(s: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}`` (one character); an empty remainder raises IndexError."""
    pieces = s.split("\\sqrt")
    out = pieces[0]
    for piece in pieces[1:]:
        out += "\\sqrt" + piece if piece[0] == "{" else "\\sqrt{" + piece[0] + "}" + piece[1:]
    return out


def _fix_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{72}`` -> ``\\frac{1}{72}``; a too-short remainder leaves ``s``."""
    pieces = s.split("\\frac")
    out = pieces[0]
    for piece in pieces[1:]:
        out += "\\frac"
        if piece[0] == "{":  # an empty remainder raises IndexError, as in the original
            out += piece
        elif len(piece) < 2:
            return s
        elif piece[1] != "{":
            out += "{" + piece[0] + "}{" + piece[1] + "}" + piece[2:]
        else:
            out += "{" + piece[0] + "}" + piece[1:]
    return out


def _fix_a_slash_b(s: str) -> str:
    """``3/4`` (integers written plainly) -> ``\\frac{3}{4}``."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        pass
    try:
        unicodedata.numeric(text)
        return True
    except (TypeError, ValueError):
        return False
