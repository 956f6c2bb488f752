"""The grid and the answer of `benchmarks.quality_scale`: setting and record names, the staged plan
from the policy registry, the fidelity ranking, and the leanest setting within a tolerance."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from xsvggt_jax.cache.core import CacheConfig
from xsvggt_jax.cache.prune import POLICIES

from . import quality

REFERENCE = quality.REFERENCE
FLOAT = "float"
CODE_WIDTHS = ("int8", "int4", "int2")    # stage 2's quantized caches (KCVT, `quality.DEFAULT_FIELDS`)
ORDERS = ("upstream", "once")
TOLERANCES = (0.01, 0.05)
WEIGHT_SEP = "+w="                         # record name of a weight variant: <cache setting>+w=<label>


def has_quant_once() -> bool:
    """CacheConfig has the quantize-once field (issue 24, item 1)."""
    return "quant_once" in {f.name for f in dataclasses.fields(CacheConfig)}


def policies() -> list[str]:
    """Every pruning policy of the registry (the uncompressed `none` apart)."""
    return [name for name, fn in POLICIES.items() if fn is not None]


def setting_text(policy: str, budget: int, width: str = FLOAT, order: str = "upstream") -> str:
    """The study's setting string (`quality.study_setting` reads it)."""
    head = f"{policy}:{budget}" if width == FLOAT else f"{policy}-{width}:{budget}"
    return head + ("/quant_once=true" if order == "once" and width != FLOAT else "")


def record_name(setting: str, weights: str = FLOAT) -> str:
    return setting if weights == FLOAT else f"{setting}{WEIGHT_SEP}{weights}"


def split_name(name: str) -> tuple[str, str]:
    """record name -> (cache setting, weights label)."""
    setting, _, weights = name.partition(WEIGHT_SEP)
    return setting, weights or FLOAT


# --------------------------------------------------------------------------------------------- plan
def plan_stage1(budgets: Sequence[int], policy_names: Sequence[str]) -> list[str]:
    """Reference, then per budget (smallest first) every policy with a float cache and the default."""
    names = [REFERENCE]
    for b in budgets:
        names += [setting_text(p, b) for p in policy_names]
        names.append(quality.default_name(b))
    return list(dict.fromkeys(names))


def rank_policies(records: dict, budget: int, policy_names: Sequence[str]) -> list[str]:
    """Policies at `budget` (float cache, float weights) by fidelity to `none`: the sum of their ranks
    in AbsRel vs none and in ATE vs none (ties: fewer bytes, then name). Missing ones are left out."""
    rows = {p: records[setting_text(p, budget)] for p in policy_names if setting_text(p, budget) in records}

    def ranks(metric):
        order = sorted(rows, key=lambda p: quality._nan(rows[p]["metrics"][metric]))
        return {p: i for i, p in enumerate(order)}
    ra, rt = ranks("abs_rel_ref"), ranks("ate_ref")
    return sorted(rows, key=lambda p: (ra[p] + rt[p], rows[p]["cache_bytes"], p))


def plan_stage2(records: dict, budgets: Sequence[int], policy_names: Sequence[str], best: int,
                widths: Sequence[str], orders: Sequence[str], weights: Sequence[str]) -> list[str]:
    """Record names of stage 2 (module docstring): per budget the `best` policies across float and the
    code `widths` x `orders` x float and `weights`; `none` per weight variant first."""
    names = [record_name(REFERENCE, w) for w in weights if w != FLOAT]
    for b in budgets:
        for p in rank_policies(records, b, policy_names)[:best]:
            cache = [setting_text(p, b)] + [setting_text(p, b, c, o) for c in widths for o in orders]
            names += [record_name(s, w) for w in (FLOAT, *weights) for s in cache]
    return list(dict.fromkeys(names))



# ---------------------------------------------------------------------------------------- analysis
#: The answer's criteria: "gt" (AbsRel and ATE vs the ground truth within (1 + tol) x the uncompressed
#: run's), "ref" (AbsRel vs none <= tol and ATE vs none <= tol x the uncompressed run's ATE), and each
#: of the two on one metric alone ("gt:abs_rel", ...).
CRITERIA = ("gt", "gt:abs_rel", "gt:ate", "ref", "ref:abs_rel", "ref:ate")


def _ok(rec: dict, ref: dict, tol: float, kind: str) -> bool:
    base, _, only = kind.partition(":")
    m, r = rec["metrics"], ref["metrics"]
    for k in (only,) if only else ("abs_rel", "ate"):
        if base == "gt":
            value, bound = quality._nan(m[k]), (1 + tol) * r[k]
        else:
            value, bound = quality._nan(m[f"{k}_ref"]), tol * (1.0 if k == "abs_rel" else r["ate"])
        if not value <= bound:  # NaN never qualifies
            return False
    return True


def leanest(records: dict, tol: float, kind: str) -> dict:
    """The answer for one tolerance and criterion (`CRITERIA`): the qualifying setting of least total bytes (ties: cache bytes, name), XStreamVGGT's default
    at its budget, and the leanest default that qualifies (None when none does)."""
    ref = records[REFERENCE]
    ok = sorted((n for n, r in records.items() if n != REFERENCE and _ok(r, ref, tol, kind)),
                key=lambda n: (records[n]["total_bytes"], records[n]["cache_bytes"], n))
    out: dict[str, Any] = {"tolerance": tol, "criterion": kind, "qualifying": len(ok), "best": None}
    if not ok:
        return out
    best = ok[0]
    rec = records[best]
    same = quality.default_name(rec["cache_config"]["budget"])
    defaults = [n for n in ok if n == quality.default_name(records[n]["cache_config"]["budget"])]
    out.update(best=best, total_bytes=rec["total_bytes"], cache_bytes=rec["cache_bytes"],
               weight_bytes=rec["weight_bytes"], metrics={k: rec["metrics"][k] for k in quality.COMPARED},
               default_same_budget=same if same in records else None,
               default_same_budget_total=records[same]["total_bytes"] if same in records else None,
               default_same_budget_cache=records[same]["cache_bytes"] if same in records else None,
               default_same_budget_ok=same in ok,
               leanest_default=defaults[0] if defaults else None,
               leanest_default_total=records[defaults[0]]["total_bytes"] if defaults else None,
               leanest_default_cache=records[defaults[0]]["cache_bytes"] if defaults else None)
    return out


def answers(records: dict) -> list[dict]:
    if REFERENCE not in records:
        return []
    return [leanest(records, tol, kind) for kind in CRITERIA for tol in TOLERANCES]

