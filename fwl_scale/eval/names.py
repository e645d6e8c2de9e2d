"""What `fwl eval --out` names, without torch: its methods (methods.py runs them) and its files (docrun.py
writes them). `fwl study` checks a spec's rulers against the methods before anything trains and reads the
results file, and its --list and --collect do without torch."""
from __future__ import annotations

BASELINE_METHODS = ("plain", "dynamic")
FWL_METHODS = ("slow_head", "fwl_reset", "fwl_carried", "dynamic")
CACHE_METHODS = ("unigram_cache", "continuous_cache")
METHODS = tuple(dict.fromkeys(BASELINE_METHODS + FWL_METHODS + CACHE_METHODS))  # every one, once
# Those whose settings are chosen on the tuning documents (dynamic evaluation's lr and decay, the caches'
# w and δ or θ).
TUNED_METHODS = ("dynamic", *CACHE_METHODS)

RESULTS = "results.json"
REPORT = "report.md"


def default_method_names(fwl: bool) -> tuple[str, ...]:
    """What `fwl eval --out` runs without --methods on an FWL (fwl) or a baseline checkpoint."""
    return FWL_METHODS if fwl else BASELINE_METHODS


def available_method_names(fwl: bool) -> tuple[str, ...]:
    """The defaults and the caches, which run on either kind of checkpoint."""
    return default_method_names(fwl) + CACHE_METHODS
