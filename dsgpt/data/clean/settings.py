"""Which cleaning stages run, with which thresholds: from `dsgpt prepare` flags and/or a YAML file.

The file (`--clean-config FILE`) has up to three sections; every key is optional:

    filters:
      gopher: true              # every Gopher rule at the paper's threshold (what --clean does)
      word_count: {min: 20}     # then change a rule (unnamed fields keep their defaults) ...
      stop_words: false         # ... switch one off ...
      script: {name: Latin}     # ... or add one
    pii: true                   # or a list of kinds: [email, phone, ipv4, ipv6, card]
    dedup:
      exact: true
      near: {threshold: 0.6, num_perm: 128, shingle_words: 3}   # or true (the defaults)

pydantic checks the fields and ranges; this module turns its errors, and unknown names, into one
UserError that says what was wrong, where, and what is allowed.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dsgpt.errors import UserError

# Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training Gopher",
# appendix A.1.1 (quality filters) and table A1 (repetition removal).
GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
GOPHER_TOP_NGRAMS = {2: 0.20, 3: 0.18, 4: 0.16}
GOPHER_DUPLICATE_NGRAMS = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
MAX_NGRAM = 20


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


def _fraction(default: float, what: str):
    return Field(default, ge=0.0, le=1.0, description=what)


class _Range(_Rule):
    """A rule with a `min` and a `max` (declared by the subclass) that must be in order."""

    @model_validator(mode="after")
    def _ordered(self):
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not be above max ({self.max})")
        return self


class WordCount(_Range):
    min: int = Field(50, ge=0, description="fewest words a document may have")
    max: int = Field(100_000, ge=1, description="most words a document may have")


class MeanWordLength(_Range):
    min: float = Field(3.0, ge=0.0, description="shortest mean word length, in characters")
    max: float = Field(10.0, gt=0.0, description="longest mean word length, in characters")


class SymbolRatio(_Rule):
    max: float = Field(0.1, ge=0.0, description="most '#' per word, and most ellipses per word")


class AlphabeticWords(_Rule):
    min: float = _fraction(0.8, "least fraction of words with an alphabetic character")


class StopWords(_Rule):
    min: int = Field(2, ge=0, description="fewest distinct stop words a document must contain")
    words: tuple[str, ...] = Field(GOPHER_STOP_WORDS, min_length=1, description="the stop words")

    @field_validator("words")
    @classmethod
    def _lower(cls, words):
        if any(not w.strip() or len(w.split()) != 1 for w in words):
            raise ValueError("each stop word must be a single non-empty word")
        return tuple(w.strip().casefold() for w in words)


class BulletLines(_Rule):
    max: float = _fraction(0.9, "most lines that may start with a bullet")


class EllipsisLines(_Rule):
    max: float = _fraction(0.3, "most lines that may end with an ellipsis")


class Script(_Rule):
    name: tuple[str, ...] = Field(..., min_length=1, description="Unicode script name(s), e.g. Latin")
    min: float = _fraction(0.8, "least fraction of letters in the named script(s)")

    @field_validator("name", mode="before")
    @classmethod
    def _one_or_more(cls, value):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")]
        return value

    @field_validator("name")
    @classmethod
    def _known(cls, names):
        import regex

        for name in names:
            try:
                regex.compile(rf"\p{{Script={name}}}")
            except regex.error:
                raise ValueError(f"{name!r} is not a Unicode script name (e.g. Latin, Cyrillic, Greek, Arabic, "
                                 "Hebrew, Devanagari, Han, Hiragana, Katakana, Hangul, Thai)") from None
        return names


class DuplicateLines(_Rule):
    max_fraction: float = _fraction(0.30, "most lines that may repeat an earlier line")
    max_char_fraction: float = _fraction(0.20, "most characters that may be in repeated lines")


class DuplicateParagraphs(_Rule):
    max_fraction: float = _fraction(0.30, "most paragraphs that may repeat an earlier paragraph")
    max_char_fraction: float = _fraction(0.20, "most characters that may be in repeated paragraphs")


def _check_ngram_map(value: dict) -> dict:
    if not value:
        raise ValueError("name at least one n-gram size")
    for n, limit in value.items():
        if not 1 <= n <= MAX_NGRAM:
            raise ValueError(f"n-gram size {n} must be between 1 and {MAX_NGRAM}")
        if not 0.0 <= limit <= 1.0:
            raise ValueError(f"the fraction for {n}-grams, {limit}, must be between 0 and 1")
    return dict(sorted(value.items()))


class _NgramFractions(_Rule):
    """A fraction per word n-gram size; the subclasses give the defaults and what it bounds."""
    max_char_fraction: dict[int, float]

    @field_validator("max_char_fraction")
    @classmethod
    def _sizes(cls, value):
        return _check_ngram_map(value)


class TopNgrams(_NgramFractions):
    max_char_fraction: dict[int, float] = Field(
        default_factory=lambda: dict(GOPHER_TOP_NGRAMS),
        description="n -> most characters the commonest word n-gram may cover")


class DuplicateNgrams(_NgramFractions):
    max_char_fraction: dict[int, float] = Field(
        default_factory=lambda: dict(GOPHER_DUPLICATE_NGRAMS),
        description="n -> most characters that may lie in repeated word n-grams")


# name -> its parameters, in the order the rules run (cheap ones first). A document that fails
# several rules is counted under the first one here.
FILTERS: dict[str, type[_Rule]] = {
    "word_count": WordCount,
    "mean_word_length": MeanWordLength,
    "symbol_ratio": SymbolRatio,
    "alphabetic_words": AlphabeticWords,
    "stop_words": StopWords,
    "bullet_lines": BulletLines,
    "ellipsis_lines": EllipsisLines,
    "script": Script,
    "duplicate_lines": DuplicateLines,
    "duplicate_paragraphs": DuplicateParagraphs,
    "top_ngrams": TopNgrams,
    "duplicate_ngrams": DuplicateNgrams,
}
GOPHER = tuple(name for name in FILTERS if name != "script")  # the paper's rules (it used no script check)
# The n-gram rules take their mapping directly: `top_ngrams: {2: 0.2, 3: 0.18}`.
_NGRAM_RULES = ("top_ngrams", "duplicate_ngrams")

PII_KINDS = ("email", "phone", "ipv4", "ipv6", "card")


class NearDedup(_Rule):
    threshold: float = Field(0.6, gt=0.0, le=1.0,
                             description="estimated Jaccard similarity at or above which a document is a near duplicate")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (signature length)")
    shingle_words: int = Field(3, ge=1, le=MAX_NGRAM, description="words per shingle")
    seed: int = Field(1, ge=0, description="seed of the MinHash permutations")


@dataclass(frozen=True)
class CleanSettings:
    """What to run: the quality filters (name -> parameters, in FILTERS order), the PII kinds to
    scrub, exact dedup on or off, near dedup settings or None. The default runs nothing."""

    filters: dict = field(default_factory=dict)
    pii: tuple = ()
    exact_dedup: bool = False
    near_dedup: Optional[NearDedup] = None

    @property
    def enabled(self) -> bool:
        return bool(self.filters or self.pii or self.exact_dedup or self.near_dedup)

    def stages(self) -> list[str]:
        """The stages that run, in the order they run."""
        return [name for name, on in (("quality_filters", self.filters), ("pii", self.pii),
                                      ("exact_dedup", self.exact_dedup), ("near_dedup", self.near_dedup)) if on]

    def to_dict(self) -> dict:
        return {
            "filters": {name: _plain(rule.model_dump()) for name, rule in self.filters.items()},
            "pii": list(self.pii),
            "dedup": {"exact": self.exact_dedup,
                      "near": self.near_dedup.model_dump() if self.near_dedup else None},
        }


def _plain(obj):
    """JSON-friendly: tuples as lists, int keys as strings."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def clean_settings(config=None, *, gopher: bool = False, script=None, pii: bool = False,
                   dedup: bool = False, near_threshold: float | None = None) -> CleanSettings:
    """Settings from an optional YAML file (path) or dict, then the command-line switches on top:
    `gopher` (--clean), `script` (--script NAME[,NAME]), `pii` (--scrub-pii), `dedup` (--dedup:
    exact and near) and `near_threshold` (--near-threshold)."""
    if config is None:
        raw, source = {}, "the command line"
    elif isinstance(config, dict):
        raw, source = config, "the cleaning settings"
    else:
        raw, source = _read_yaml(Path(config).expanduser()), f"prepare config {config}"
    raw = dict(raw)
    _check_keys(raw, ("filters", "pii", "dedup"), source, "")
    filters = _section(raw.get("filters"), source, "filters")
    if gopher:
        filters["gopher"] = True
    if script:
        current = filters.get("script")
        filters["script"] = {**(current if isinstance(current, dict) else {}), "name": script}
    dedup_raw = raw.get("dedup")
    if isinstance(dedup_raw, bool) or dedup_raw is None:
        dedup_raw = {"exact": True, "near": True} if dedup_raw else {}
    dedup_raw = _section(dedup_raw, source, "dedup")
    _check_keys(dedup_raw, ("exact", "near"), source, "dedup.")
    if dedup:
        dedup_raw.setdefault("exact", True)
        if not dedup_raw.get("near"):
            dedup_raw["near"] = True
    if near_threshold is not None:
        if not dedup_raw.get("near"):
            raise UserError(f"--near-threshold {near_threshold} was given, but near-duplicate removal is not on. "
                            "Add --dedup (exact and near duplicates), or set dedup.near in the --clean-config file.")
        near = dedup_raw["near"]
        dedup_raw["near"] = {**(near if isinstance(near, dict) else {}), "threshold": near_threshold}
    return CleanSettings(
        filters=_filters(filters, source),
        pii=_pii(True if pii else raw.get("pii", False), source),
        exact_dedup=_flag(dedup_raw.get("exact", False), source, "dedup.exact"),
        near_dedup=_near(dedup_raw.get("near", False), source),
    )


def _read_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise UserError(f"The prepare config {path} does not exist. Pass a YAML file to --clean-config "
                        "(see the README's section on cleaning for its keys).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"The prepare config {path} is not UTF-8 text. Save it as UTF-8 YAML.") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"The prepare config {path} is not valid YAML ({what}{where}). Fix the file.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"The prepare config {path} must be a mapping with the keys filters, pii and dedup; "
                        f"it holds a {type(data).__name__}.")
    return data


def _check_keys(raw: dict, allowed, source: str, prefix: str) -> None:
    for key in raw:
        if key not in allowed:
            raise UserError(f"{source}: unknown key '{prefix}{key}'{_hint(str(key), allowed)}. "
                            f"Allowed here: {', '.join(allowed)}.")


def _section(value, source: str, name: str) -> dict:
    if value is None or value is False:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{source}: '{name}' must be a mapping (name: settings), not {value!r}. "
                        "See the README's section on cleaning for an example.")
    return dict(value)


def _hint(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _flag(value, source: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{source}: '{where}' must be true or false, not {value!r}.")
    return value


def _filters(raw: dict, source: str) -> dict:
    wanted: dict = {}
    gopher = raw.pop("gopher", False)
    if not isinstance(gopher, bool):
        raise UserError(f"{source}: 'filters.gopher' must be true or false (true: every Gopher rule at the "
                        f"paper's threshold), not {gopher!r}.")
    if gopher:
        wanted = {name: {} for name in GOPHER}
    for name, params in raw.items():
        if name not in FILTERS:
            raise UserError(
                f"{source}: unknown filter '{name}'{_hint(str(name), [*FILTERS, 'gopher'])}. The filters are "
                f"{', '.join(FILTERS)}, and 'gopher: true' turns on all but script. Fix the name, or remove it.")
        if params is False:
            wanted.pop(name, None)
        elif params is None or params is True:
            wanted[name] = {}
        elif isinstance(params, dict):
            wanted[name] = params
        else:
            raise UserError(f"{source}: filter '{name}' takes a mapping of its settings, true (its defaults) or "
                            f"false (off), not {params!r}. Its settings: {_fields(name)}.")
    out = {}
    for name in FILTERS:  # run order, whatever order the file used
        if name in wanted:
            params = wanted[name]
            if name in _NGRAM_RULES and params and "max_char_fraction" not in params:
                params = {"max_char_fraction": params}
            out[name] = _validate(FILTERS[name], params, source, f"filters.{name}")
    return out


def _fields(name: str) -> str:
    model = FILTERS[name]
    if name in _NGRAM_RULES:
        default = model().max_char_fraction
        return "a mapping of n-gram size to the largest allowed character fraction, default " + \
               ", ".join(f"{n}: {v}" for n, v in default.items())
    parts = []
    for key, info in model.model_fields.items():
        default = "required" if info.is_required() else f"default {_plain(info.default)}"
        parts.append(f"{key} ({info.description}; {default})")
    return "; ".join(parts)


def _validate(model, params: dict, source: str, where: str):
    try:
        return model(**params)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            given = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg, given = "unknown setting" + _hint(str(e["loc"][-1]), model.model_fields), ""
            problems.append(f"{where}{'.' + loc if loc else ''}: {msg}{given}")
        name = where.rpartition(".")[2]
        allowed = _fields(name) if name in FILTERS else "; ".join(
            f"{k} ({i.description}; default {i.default})" for k, i in model.model_fields.items())
        raise UserError(f"{source}: {'; '.join(problems)}. Allowed settings of {where}: {allowed}.") from None
    except TypeError as err:  # a non-string key in the mapping
        raise UserError(f"{source}: {where} has a setting that is not a name ({err}).") from None


def _pii(value, source: str) -> tuple:
    if value is True:
        return PII_KINDS
    if value is False or value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{source}: 'pii' must be true, false or a list of kinds ({', '.join(PII_KINDS)}), "
                        f"not {value!r}.")
    for kind in value:
        if kind not in PII_KINDS:
            raise UserError(f"{source}: unknown PII kind '{kind}'{_hint(str(kind), PII_KINDS)}. The kinds are "
                            f"{', '.join(PII_KINDS)}; 'pii: true' scrubs them all.")
    return tuple(k for k in PII_KINDS if k in value)


def _near(value, source: str) -> Optional[NearDedup]:
    if value is False or value is None:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise UserError(f"{source}: 'dedup.near' must be true, false or a mapping of its settings, not {value!r}.")
    return _validate(NearDedup, value, source, "dedup.near")
