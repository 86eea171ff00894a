"""Reading answers: one rule per family, used both by the task loaders (the gold answer of a
reference solution) and by the scorers of :mod:`pktlib.evaluation` (a model's completion)."""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any, Sequence

__all__ = ["extract_number", "DECIMAL_REL_TOL", "numbers_equal", "extract_choice", "LETTERS", "gsm_meta", "mmlu_meta"]


# A number as written in prose: optional sign and "$", digits with thousands commas, decimals.
_NUMBER = r"[-+]?\$?\s*(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
# The cue before a final number: the last "answer is" or "####"; up to 16 characters of filler
# (": ", "**", "about ") may separate them, but not a digit, a sign or a new line.
_NUMBER_CUE = re.compile(r"(?:answer is|####)[^\d\n\-+$.]{0,16}?(" + _NUMBER + ")", re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{((?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*)\}")
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([-+]?\d+(?:\.\d+)?)\s*\}\s*\{\s*([-+]?\d+(?:\.\d+)?)\s*\}")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")
_FIRST_NUMBER = re.compile(_NUMBER)


def _plain_math(text: str) -> str:
    """``text`` with the LaTeX of written numbers made plain.

    ``\\frac{a}{b}`` of two numbers becomes their quotient, ``\\text{..}`` its content,
    ``1{,}000`` and ``1\\,000`` become ``1,000``/``1000``, ``\\$`` and ``\\%`` lose the
    backslash and the Unicode minus becomes ``-``.
    """
    text = text.replace("\u2212", "-").replace("{,}", ",").replace("\\,", "").replace("\\!", "")
    text = text.replace("\\$", "$").replace("\\%", "%").replace("\\left", "").replace("\\right", "")
    text = _TEXT.sub(r"\1", text)

    def quotient(m: re.Match) -> str:
        num, den = float(m.group(1)), float(m.group(2))
        return m.group(0) if den == 0 else f"{num / den:.12g}"

    return _FRAC.sub(quotient, text)


def _clean_number(s: str) -> str:
    return s.replace(",", "").replace("$", "").replace(" ", "").lstrip("+").rstrip(".")


def extract_number(text: str) -> str | None:
    """The final number of a math answer (commas, "$" and a "+" sign removed), or None.

    The number inside the last ``\\boxed{..}`` when there is one (LaTeX answers), else the
    number after the last "answer is" or "####" (the GSM8K and pocket-math formats). LaTeX
    fractions of two numbers are read as their quotient.

    >>> extract_number("3 + 4 = 7. So the answer is $1,234.")
    '1234'
    >>> extract_number("The answer is $\\boxed{18}$.")
    '18'
    """
    boxed = _BOXED.findall(text)
    if boxed:
        m = _FIRST_NUMBER.search(_plain_math(boxed[-1]))
        return _clean_number(m.group(0)) if m else None
    found = _NUMBER_CUE.findall(_plain_math(text))
    return _clean_number(found[-1]) if found else None


# Relative tolerance for a gold answer that is not an integer: it absorbs binary-float noise
# ("0.30000000000000004" for 0.3) and nothing a reader would call a different answer.
DECIMAL_REL_TOL = 1e-6


def _as_decimal(s: str | None):
    if s is None:
        return None
    try:
        d = Decimal(_clean_number(str(s).strip()))
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def numbers_equal(pred: str | None, gold: str | None, rel_tol: float = DECIMAL_REL_TOL) -> bool:
    """Whether a predicted number equals the gold one ("18" == "18.00" == "$18"; None never equals).

    Integer golds compare exactly, as decimals, so ``1450001`` is not ``1450000`` (GSM8K's test
    set has golds of that size, where a float tolerance would accept neighbours). A gold with a
    fractional part accepts ``|pred - gold| <= rel_tol * max(1, |gold|)``
    (:data:`DECIMAL_REL_TOL`, 1e-6).
    """
    p, g = _as_decimal(pred), _as_decimal(gold)
    if p is None or g is None:
        return False
    if g == g.to_integral_value():
        return p == g
    return abs(float(p) - float(g)) <= rel_tol * max(1.0, abs(float(g)))


# The letter cue is case-insensitive ("answer is", "Answer is:"), the letter is not: an upper-case
# A-D standing alone, or a lower-case one only where nothing but a letter fits: "(b)", "b)" or
# "b" ending the sentence. So "The answer is a parrot." reads no letter, and the choice texts
# decide (below).
_ANSWER_CUE = re.compile(r"answer is:?\s*", re.IGNORECASE)
_CUE_LETTER = re.compile(r"\(?([A-D])(?![A-Za-z0-9'])|\(([a-d])\)|([a-d])(?:\)|\.?\s*$)")
_ANY_LETTER = re.compile(r"(?<![A-Za-z])([A-D])(?![A-Za-z])")
_ARTICLE = re.compile(r"^(?:an?|the)\s+", re.IGNORECASE)


def _choice_by_text(rest: str, choices: Sequence[str]) -> str | None:
    """The letter of the choice whose text starts ``rest`` (after an article; whole words; the
    longest match, so "pine" does not shadow "pineapple"), or None."""
    rest = rest.lstrip(" \t\n(\"'*").lower()
    candidates = [rest]
    m = _ARTICLE.match(rest)
    if m:
        candidates.append(rest[m.end():])
    hits = [(len(c), "ABCD"[i]) for text in candidates for i, c in enumerate(choices[:4])
            if c and text.startswith(c.lower()) and not text[len(c):len(c) + 1].isalnum()]
    return max(hits)[1] if hits else None


def extract_choice(text: str, choices: Sequence[str] | None = None) -> str | None:
    """The letter (A-D) a multiple-choice answer gives, or None.

    After the first "The answer is:" (any case): a letter there (upper-case standing alone,
    or lower-case in brackets or ending the answer), unless, given the ``choices``, an article
    ("a", "an", "the", any case) starts a choice's text there ("The answer is a parrot." is
    the choice "parrot"); else the choice whose text follows. Without the cue: the choice whose
    text starts the answer; else the first upper-case A-D standing alone.

    >>> extract_choice("The answer is a parrot.", ["beagle", "parrot", "goose", "owl"])
    'B'
    >>> extract_choice("the answer is (b)")
    'B'
    """
    cue = _ANSWER_CUE.search(text)
    rest = text[cue.end():].lstrip("*\"'[ \t") if cue else text
    if cue:
        article = _ARTICLE.match(rest)
        if choices and article:
            hit = _choice_by_text(rest[article.end():], choices)
            if hit:
                return hit
        m = _CUE_LETTER.match(rest)
        if m:
            return next(g for g in m.groups() if g).upper()
    if choices:
        hit = _choice_by_text(rest, choices)
        if hit:
            return hit
    m = _ANY_LETTER.search(text)
    return m.group(1) if m else None


LETTERS = ("A", "B", "C", "D")


def gsm_meta(answer_text: str) -> dict[str, Any]:
    n = extract_number(answer_text)
    return {"answer": n} if n is not None else {}


def mmlu_meta(answer_text: str) -> dict[str, Any]:
    letter = extract_choice(answer_text)
    return {"answer": letter} if letter in LETTERS and _ANSWER_CUE.search(answer_text) else {}
