"""The rules every user-facing setting obeys, and the class-order comparison every combination uses.

A dataclass declares a setting's rule in the field's annotation, `typing.Annotated[float, at_least(0)]`
(`HfArgumentParser` and `dataclasses` see the plain type; `check_fields` reads the rule), and calls
`check_fields(self)` in `__post_init__`. Plain functions and classes check their arguments with
`check_value(where, value, rule)`. Every error is a `ValueError` (a `TypeError` for a wrong kind of
object) that names the setting, the value and what is accepted: a NaN loss weight or a mean on the
0-255 scale must fail at once, not train a meaningless adapter.

Class order: `class_order_difference` finds the first position where two objects' class lists
differ (`check_class_order` raises with it); `check_class_names` refuses a string where a list of
names belongs ("cat" is not ['c', 'a', 't']); `check_template` refuses prompt templates that
`template.format(name)` cannot fill with exactly one class name.
"""

from __future__ import annotations

import functools
import math
import numbers
import re
import string
import typing
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

__all__ = [
    "Custom", "Rule", "at_least", "between", "check_class_ids", "check_class_names", "check_class_order",
    "check_fields", "check_image_stats", "check_template", "check_templates", "check_value", "class_name_key",
    "class_order_difference", "flag", "greater_than", "integer", "interval", "label_names_of",
    "label_order_difference", "number", "one_of", "probability", "text",
]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# ---- rules ----------------------------------------------------------------------------------------


class Rule:
    """A check of one setting's value. `problem(value)` says what is wrong (None: nothing);
    `describe()` says what is accepted, for the error and the docs."""

    def describe(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def problem(self, value: Any) -> Optional[str]:  # pragma: no cover - interface
        raise NotImplementedError

    def hint(self, value: Any) -> str:
        """What to do, where the value is recognisably on a wrong scale ("" otherwise)."""
        return ""


@dataclass(frozen=True)
class Number(Rule):
    """A finite real (or integer) number in a range; `scale="fraction"` recognises percentages."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    whole: bool = False
    optional: bool = False
    scale: Optional[str] = None

    def describe(self) -> str:
        kind = "an integer" if self.whole else "a finite number"
        parts = []
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            parts.append(f"in {left}{self.low:g}, {self.high:g}{right}")
        elif self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        elif self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " ".join([kind] + parts) + (" or None" if self.optional else "")

    def problem(self, value: Any) -> Optional[str]:
        if value is None:
            return None if self.optional else "is None"
        if not (_is_integer(value) if self.whole else _is_real(value)):
            return f"is a {type(value).__name__}"
        if not math.isfinite(float(value)):
            return "is not finite"
        v = float(value)
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return "is too small"
        if self.high is not None and (v >= self.high if self.high_open else v > self.high):
            return "is too large"
        return None

    def hint(self, value: Any) -> str:
        if self.scale == "fraction" and _is_real(value) and 1 < float(value) <= 100:
            return f" ({value:g} looks like a percentage: give the fraction, {float(value) / 100:g})"
        return ""


def number(optional: bool = False) -> Number:
    """Any finite number."""
    return Number(optional=optional)


def at_least(low: float, optional: bool = False) -> Number:
    """A finite number >= `low`."""
    return Number(low=low, optional=optional)


def greater_than(low: float, optional: bool = False) -> Number:
    """A finite number > `low`."""
    return Number(low=low, low_open=True, optional=optional)


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False,
            optional: bool = False, scale: Optional[str] = None) -> Number:
    """A finite number in the range (brackets: `low_open` / `high_open`)."""
    return Number(low=low, high=high, low_open=low_open, high_open=high_open, optional=optional, scale=scale)


def probability(optional: bool = False) -> Number:
    """A fraction in [0, 1]; a percentage (1 < x <= 100) is recognised in the error."""
    return Number(low=0.0, high=1.0, optional=optional, scale="fraction")


def integer(low: Optional[int] = None, high: Optional[int] = None, optional: bool = False) -> Number:
    """An integer (Python or numpy; not a bool) in `[low, high]`."""
    return Number(low=low, high=high, whole=True, optional=optional)


@dataclass(frozen=True)
class OneOf(Rule):
    choices: tuple
    optional: bool = False

    def describe(self) -> str:
        return f"one of {', '.join(repr(c) for c in self.choices)}" + (" or None" if self.optional else "")

    def problem(self, value: Any) -> Optional[str]:
        if value is None and self.optional:
            return None
        return None if any(value == c and type(value) is type(c) for c in self.choices) else "is not one of them"


def one_of(*choices: Any, optional: bool = False) -> OneOf:
    """One of `choices` (compared with == and by type: True is not 1)."""
    return OneOf(tuple(choices), optional)


@dataclass(frozen=True)
class Flag(Rule):
    optional: bool = False

    def describe(self) -> str:
        return "True or False" + (" or None" if self.optional else "")

    def problem(self, value: Any) -> Optional[str]:
        if value is None and self.optional:
            return None
        # "False" would be true: a bool from a config file must be a JSON boolean
        return None if isinstance(value, bool) else f"is a {type(value).__name__}"


def flag(optional: bool = False) -> Flag:
    """A bool."""
    return Flag(optional)


@dataclass(frozen=True)
class Text(Rule):
    optional: bool = False
    non_empty: bool = True

    def describe(self) -> str:
        return ("a non-empty string" if self.non_empty else "a string") + (" or None" if self.optional else "")

    def problem(self, value: Any) -> Optional[str]:
        if value is None:
            return None if self.optional else "is None"
        if not isinstance(value, str):
            return f"is a {type(value).__name__}"
        return "is empty" if self.non_empty and not value.strip() else None


def text(optional: bool = False, non_empty: bool = True) -> Text:
    """A string (non-empty unless `non_empty=False`)."""
    return Text(optional, non_empty)


@dataclass(frozen=True)
class Interval(Rule):
    """Two finite numbers `(min, max)`, `min <= max`, both inside `bounds` (a `Number` rule)."""

    bounds: Number

    def describe(self) -> str:
        each = self.bounds.describe().removeprefix("a finite number ")
        return f"two finite numbers (min, max) with min <= max, each {each}"

    def problem(self, value: Any) -> Optional[str]:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
            return "is not a pair"
        if any(self.bounds.problem(v) for v in value):
            return "has a value out of range"
        return "has min > max" if float(value[0]) > float(value[1]) else None


def interval(low: Optional[float] = None, high: Optional[float] = None, *, low_open: bool = False) -> Interval:
    """A `(min, max)` pair of finite numbers in `[low, high]` (`low_open`: min > low)."""
    return Interval(Number(low=low, high=high, low_open=low_open))


@dataclass(frozen=True)
class Custom(Rule):
    """A rule given as a function `check(where, value)` that raises its own error; `what` describes
    what it accepts."""

    check: Callable[[str, Any], Any]
    what: str

    def describe(self) -> str:
        return self.what

    def problem(self, value: Any) -> Optional[str]:  # pragma: no cover - check_value calls `check` instead
        return None


# ---- applying rules -------------------------------------------------------------------------------


def check_value(where: str, value: Any, rule: Rule) -> Any:
    """Refuse `value` unless `rule` accepts it; `where` names the setting ("RegionSpec.flip_prob").
    Returns the value unchanged."""
    if isinstance(rule, Custom):
        rule.check(where, value)
        return value
    problem = rule.problem(value)
    if problem is not None:
        raise ValueError(f"{where} must be {rule.describe()}, got {_shown(value)}{rule.hint(value)}")
    return value


@functools.lru_cache(maxsize=None)
def _declared_rules(cls: type) -> tuple[tuple[str, tuple[Rule, ...]], ...]:
    hints = typing.get_type_hints(cls, include_extras=True)
    found = []
    for f in fields(cls):
        hint = hints.get(f.name)
        rules = tuple(m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Rule))
        if rules:
            found.append((f.name, rules))
    return tuple(found)


def check_fields(obj: Any, extra: Optional[Mapping[str, Rule]] = None) -> None:
    """Check every field of the dataclass `obj` whose annotation carries a `Rule`
    (`Annotated[float, at_least(0)]`), then the fields named in `extra` (rules for inherited fields
    whose annotations are not ours). Errors name `Class.field`."""
    owner = type(obj).__name__
    for name, rules in _declared_rules(type(obj)):
        for rule in rules:
            check_value(f"{owner}.{name}", getattr(obj, name), rule)
    for name, rule in (extra or {}).items():
        check_value(f"{owner}.{name}", getattr(obj, name), rule)


# ---- image statistics -----------------------------------------------------------------------------

_CLIP_HINT = "OpenAI CLIP's are mean (0.4815, 0.4578, 0.4082), std (0.2686, 0.2613, 0.2758)"


def _three_numbers(where: str, value: Any) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"{where} must be 3 numbers (one per RGB channel), got {_shown(value)}")
    try:
        items = list(value.tolist() if hasattr(value, "tolist") else value)
    except TypeError as err:
        raise ValueError(f"{where} must be 3 numbers (one per RGB channel), got {_shown(value)}") from err
    if len(items) != 3 or not all(_is_real(v) for v in items):
        raise ValueError(f"{where} must be 3 numbers (one per RGB channel), got {_shown(value)}"
                         + (f" ({len(items)} values)" if len(items) != 3 else ""))
    if not all(math.isfinite(float(v)) for v in items):
        raise ValueError(f"{where} must be 3 finite numbers, got {_shown(value)}")
    # numpy / torch scalars as the Python numbers they hold (an int stays an int): the values go into
    # JSON build and cache keys, which a float32 scalar cannot enter and where 1 and 1.0 differ
    return tuple(v.item() if hasattr(v, "item") and not isinstance(v, (int, float)) else v for v in items)


def check_image_stats(mean_where: str, mean: Any, std_where: str, std: Any) -> tuple[tuple[float, ...],
                                                                              tuple[float, ...]]:
    """Per-channel normalisation of pixels in [0, 1]: `mean` 3 finite numbers in [0, 1], `std` 3
    in (0, 1]. Values on the 0-255 scale are recognised and refused with a hint. Returns both as
    tuples of plain Python numbers, each as given (numpy or torch values converted, ints kept): what
    to keep and record; `mean_where` / `std_where` name the settings ("RILDataset image_mean")."""
    m = _three_numbers(mean_where, mean)
    s = _three_numbers(std_where, std)
    for where, values, ok, accepted in ((mean_where, m, all(0 <= v <= 1 for v in m), "[0, 1]"),
                                        (std_where, s, all(0 < v <= 1 for v in s), "(0, 1]")):
        if ok:
            continue
        hint = ""
        if max(values) > 1 and all(0 <= v <= 255 for v in values):
            hint = (": these look like values on the 0-255 pixel scale; pixels are normalised in [0, 1], so divide "
                    f"them by 255 ({_CLIP_HINT})")
        raise ValueError(f"{where} must be 3 numbers in {accepted} (pixels are in [0, 1]), got {list(values)}{hint}")
    return m, s


# ---- class names, ids and templates ---------------------------------------------------------------


def class_name_key(name: str) -> str:
    """A class name compared case/punctuation-insensitively: "BACKGROUND_Google" -> "backgroundgoogle"."""
    return re.sub(r"[^0-9a-z]+", "", name.lower())


def _not_a_string(where: str, value: Any, what: str, example: str) -> None:
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{where} must be a list of {what}, not the single string {_shown(value)} (which would be read "
                        f"as its characters, {_shown(list(value)[:4])}...): pass a list, e.g. {example}")


def check_class_names(where: str, names: Any, *, unique: bool = True) -> list[str]:
    """A list of class names: refuses a bare string, a non-sequence, an empty list, names that are
    not non-empty strings, and (with `unique`) a name given twice. Returns them as a list."""
    _not_a_string(where, names, "strings (class names)", f"[{names!r}]")
    if isinstance(names, Mapping) or not isinstance(names, Iterable):
        raise TypeError(f"{where} must be a list of class names (strings), got {type(names).__name__}")
    names = list(names)
    if not names:
        raise ValueError(f"{where} is empty: give at least one class name")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: class names must be non-empty strings, got {_shown(name)} for class {i}")
    if unique:
        seen: dict[str, int] = {}
        for i, name in enumerate(names):
            j = seen.setdefault(name, i)
            if j != i:
                raise ValueError(f"{where}: classes {j} and {i} are both named {name!r}; class names must be unique")
    return names


def check_class_ids(where: str, ids: Any) -> list[int]:
    """A list of integer class ids: refuses a bare string ("012" is not [0, 1, 2]), non-integers
    and bools. Returns them as Python ints."""
    _not_a_string(where, ids, "integers (class ids)", "[0, 1, 2]")
    if isinstance(ids, Mapping) or not isinstance(ids, Iterable):
        raise TypeError(f"{where} must be a list of integer class ids, got {type(ids).__name__}")
    out = []
    for i, value in enumerate(ids.tolist() if hasattr(ids, "tolist") else ids):
        if not _is_integer(value):
            raise ValueError(f"{where}: entry {i} must be an integer class id, got {_shown(value)}")
        out.append(int(value))
    return out


def check_template(where: str, template: Any) -> str:
    """A prompt template that `template.format(class_name)` fills with the name exactly once: one
    `{}` (or `{0}`) field, no named field (`{name}`), no second field; literal braces are `{{ }}`."""
    if not isinstance(template, str):
        raise ValueError(f"{where} must be a string with one '{{}}' for the class name, got {_shown(template)}")
    try:
        found = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(f"{where} {template!r} is not a valid format string ({err}): write literal braces as "
                         "'{{' and '}}'") from err
    if len(found) != 1 or found[0] not in ("", "0"):
        if not found:
            what = "has no '{}' field, so every class would get the same prompt"
        elif len(found) > 1:
            shown = ", ".join("{" + f + "}" for f in found)
            what = f"has {len(found)} fields ({shown}), and only one class name fills it"
        else:
            what = f"has the field {{{found[0]}}}, which format(class_name) cannot fill"
        raise ValueError(f"{where} {template!r} {what}: a template holds exactly one '{{}}' for the class name, e.g. "
                         "'a photo of a {}.'")
    return template


def check_templates(where: str, templates: Any) -> list[str]:
    """One template (a string) or a non-empty list of them, each checked by `check_template`."""
    if isinstance(templates, str):
        return [check_template(where, templates)]
    if isinstance(templates, Mapping) or not isinstance(templates, Iterable):
        raise ValueError(f"{where} must be a template string or a list of them, got {_shown(templates)}")
    templates = list(templates)
    if not templates:
        raise ValueError(f"{where} is empty: give at least one template")
    return [check_template(f"{where}[{i}]", t) for i, t in enumerate(templates)]


# ---- class order ----------------------------------------------------------------------------------


def class_order_difference(first_what: str, first: Sequence[str], second_what: str,
                           second: Sequence[str]) -> Optional[str]:
    """None when the two class lists are equal, else where they first differ: the index and both
    names (or the class count, when one list is a prefix of the other)."""
    first, second = list(first), list(second)
    for i, (a, b) in enumerate(zip(first, second)):
        if a != b:
            counts = "" if len(first) == len(second) else \
                f" ({first_what} has {len(first)} classes, {second_what} {len(second)})"
            return f"class {i} is {a!r} in {first_what} but {b!r} in {second_what}{counts}"
    if len(first) != len(second):
        longer, extra = (first_what, first) if len(first) > len(second) else (second_what, second)
        return (f"{first_what} has {len(first)} classes, {second_what} {len(second)}: they agree up to class "
                f"{min(len(first), len(second)) - 1}, then {longer} goes on with class {min(len(first), len(second))} "
                f"{extra[min(len(first), len(second))]!r}")
    return None


def label_order_difference(label_what: str, label_names: Sequence[str], given_what: str,
                           given: Sequence[str]) -> Optional[str]:
    """Like `class_order_difference` for a dataset's `ClassLabel` names (raw: "AnnualCrop") against
    class names given for prompts (cleaned: "Annual Crop Land"), which may be spelled otherwise. A
    count difference is always one; otherwise a position differs when the name given there is,
    case and punctuation aside, another of the label's classes (or the label's name there is
    another given name): a reordering. Names cleaned beyond recognition cannot be compared."""
    label_names, given = list(label_names), list(given)
    if len(label_names) != len(given):
        return class_order_difference(label_what, label_names, given_what, given)
    label_keys, given_keys = [class_name_key(n) for n in label_names], [class_name_key(n) for n in given]
    label_at = {k: i for i, k in enumerate(label_keys)}
    given_at = {k: i for i, k in enumerate(given_keys)}
    for i, (lk, gk) in enumerate(zip(label_keys, given_keys)):
        if lk == gk:
            continue
        if label_at.get(gk, i) != i:
            return (f"class {i} is {label_names[i]!r} in {label_what} but {given[i]!r} in {given_what}, which is "
                    f"class {label_at[gk]} ({label_names[label_at[gk]]!r}) in {label_what}")
        if given_at.get(lk, i) != i:
            return (f"class {i} is {label_names[i]!r} in {label_what} but {given[i]!r} in {given_what}, which gives "
                    f"{label_names[i]!r} as class {given_at[lk]}")
    return None


def check_class_order(first_what: str, first: Sequence[str], second_what: str, second: Sequence[str], *,
                      labels: bool = False, fix: str = "") -> None:
    """Refuse two class lists that differ, naming the first differing position (`labels=True`:
    `first` is a dataset's `ClassLabel` names, compared by `label_order_difference`). `fix` says
    what to do."""
    differ = (label_order_difference if labels else class_order_difference)(first_what, first, second_what, second)
    if differ is not None:
        raise ValueError(f"the classes of {first_what} and {second_what} differ: {differ}. Every object that "
                         "carries class names must list the same classes in the same (label) order"
                         + (f"; {fix}" if fix else ""))


def label_names_of(dataset: Any, label_column: Optional[str]) -> Optional[list[str]]:
    """The `ClassLabel` names of `dataset[label_column]`, or None when it is not a `ClassLabel`."""
    features = getattr(dataset, "features", None)
    if features is None or label_column is None or label_column not in features:
        return None
    names = getattr(features[label_column], "names", None)
    return list(names) if names is not None else None

