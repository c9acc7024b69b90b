"""Generation options of a request (lmms-eval's ``gen_kwargs``): parsed, checked, turned into
``generate`` arguments, and applied to the decoded text.

lmms-eval hands every ``generate_until`` request a dict of generation keywords (the task yaml's
``generation_kwargs`` merged with the command line's ``--gen_kwargs``). `parse_gen_kwargs` accepts
the keys in `SUPPORTED` and refuses any other key with an error naming it and the supported ones,
so no option is silently ignored:

- ``max_new_tokens`` (int >= 1), ``num_beams`` (1 only: the per-sample records of a pruned prefill
  follow the batch rows, which beam search multiplies);
- ``temperature`` (>= 0), ``do_sample`` (default: ``temperature > 0``, lmms-eval's convention),
  ``top_p`` (in (0, 1]), ``top_k`` (int >= 0): sampling, applied only when ``do_sample``;
- ``until`` / ``stop`` (a string or a list of strings): generation stops at the first stop string
  (transformers' ``stop_strings``) and the text is cut before it (`cut_at_stops`).

>>> options = parse_gen_kwargs({"until": ["\\n"], "max_new_tokens": 4, "temperature": 0}, default_max_new_tokens=16)
>>> options.max_new_tokens, options.do_sample, options.until
(4, False, ('\\n',))
>>> cut_at_stops("red\\nblue", options.until)
'red'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from vtprune.framework.errors import VtpruneError

__all__ = ["SUPPORTED", "GenerationOptions", "parse_gen_kwargs", "cut_at_stops"]

#: the gen_kwargs keys the vtprune lmms-eval model applies
SUPPORTED: tuple[str, ...] = ("max_new_tokens", "temperature", "do_sample", "top_p", "top_k", "num_beams", "until", "stop")


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate one request's answer (hashable: requests with equal options share batches)."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    until: tuple[str, ...] = ()

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``model.generate`` besides ``max_new_tokens`` (sampling ones only when sampling)."""
        out: dict[str, Any] = {"do_sample": self.do_sample}
        if self.do_sample:
            for name in ("temperature", "top_p", "top_k"):
                value = getattr(self, name)
                if value is not None:
                    out[name] = value
        return out


def _number(key: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise VtpruneError(f"gen_kwargs {key}={value!r}: expected a {kind.__name__}")
    try:
        number = kind(value)
    except ValueError:
        raise VtpruneError(f"gen_kwargs {key}={value!r}: expected a {kind.__name__}") from None
    if kind is int and isinstance(value, float) and number != value:
        raise VtpruneError(f"gen_kwargs {key}={value!r}: expected a whole number")
    return number


def _flag(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise VtpruneError(f"gen_kwargs {key}={value!r}: expected true or false")


def _stops(key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise VtpruneError(f"gen_kwargs {key}={value!r}: expected a string or a list of strings")
    return tuple(s for s in items if s)


def parse_gen_kwargs(gen_kwargs: Optional[Mapping[str, Any]], default_max_new_tokens: int) -> GenerationOptions:
    """`GenerationOptions` from a request's ``gen_kwargs``; an unknown key or a bad value raises
    `VtpruneError` naming the key (and, for unknown keys, the supported ones)."""
    kwargs = dict(gen_kwargs or {})
    unknown = sorted(set(kwargs) - set(SUPPORTED))
    if unknown:
        raise VtpruneError(
            f"gen_kwargs {', '.join(repr(k) for k in unknown)} not supported by the vtprune lmms-eval model; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    max_new = _number("max_new_tokens", kwargs.get("max_new_tokens", default_max_new_tokens), int)
    if max_new < 1:
        raise VtpruneError(f"gen_kwargs max_new_tokens must be >= 1, got {max_new}")
    beams = _number("num_beams", kwargs.get("num_beams", 1), int)
    if beams != 1:
        raise VtpruneError(
            f"gen_kwargs num_beams={beams} not supported: only num_beams=1 (beam search multiplies the batch rows "
            "that the pruning records follow); use do_sample or greedy decoding"
        )
    temperature = kwargs.get("temperature")
    temperature = None if temperature is None else _number("temperature", temperature, float)
    if temperature is not None and temperature < 0:
        raise VtpruneError(f"gen_kwargs temperature must be >= 0, got {temperature}")
    sample = _flag("do_sample", kwargs["do_sample"]) if "do_sample" in kwargs else bool(temperature)
    if sample and temperature == 0:
        raise VtpruneError("gen_kwargs do_sample=True needs temperature > 0 (temperature=0 is greedy decoding)")
    top_p = kwargs.get("top_p")
    top_p = None if top_p is None else _number("top_p", top_p, float)
    if top_p is not None and not 0 < top_p <= 1:
        raise VtpruneError(f"gen_kwargs top_p must be in (0, 1], got {top_p}")
    top_k = kwargs.get("top_k")
    top_k = None if top_k is None else _number("top_k", top_k, int)
    if top_k is not None and top_k < 0:
        raise VtpruneError(f"gen_kwargs top_k must be >= 0, got {top_k}")
    until = _stops("until", kwargs.get("until")) + _stops("stop", kwargs.get("stop"))
    return GenerationOptions(max_new, sample, temperature, top_p, top_k, tuple(dict.fromkeys(until)))


def cut_at_stops(text: str, until: tuple[str, ...] | list[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string (whole text when none occurs)."""
    cut = len(text)
    for stop in until:
        found = text.find(stop) if stop else -1
        if 0 <= found < cut:
            cut = found
    return text[:cut]
