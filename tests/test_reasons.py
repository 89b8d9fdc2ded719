"""The documented reason sets cover every reason the code can count.

The scan reads the source (AST, not regular expressions) of `dataplane/`
for every way a drop or a refusal gets its name: `_drop("x")`,
`drops["x"]`, `PacketError("x")`, `HeaderError("x")`, `Drop("x")`,
`Verdict(Action.DROP, "x")` (and REPLY, which counts a drop too);
`SyncError("x")`, `_reject("x")`, `rejected["x"]`. A new reason in any of
those forms fails this test until it has its line in
`dataplane.core.reasons`.
"""

from __future__ import annotations

import ast
from pathlib import Path

from dataplane.core.reasons import (DROP_ALIASES, DROP_REASONS, REFUSAL_REASONS, drop_reason,
                                    refusal_reason)

ROOT = Path(__file__).resolve().parents[1] / "dataplane"
DROP_CALLS = {"_drop", "PacketError", "HeaderError", "Drop"}
REFUSAL_CALLS = {"SyncError", "_reject"}


def _strings(node: ast.AST | None) -> set[str]:
    if node is None:
        return set()
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _name(func: ast.AST) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _verdict_reason(call: ast.Call) -> ast.AST | None:
    if not call.args or _name(call.args[0]) not in ("DROP", "REPLY"):
        return None
    if len(call.args) > 1:
        return call.args[1]
    return next((k.value for k in call.keywords if k.arg == "reason"), None)


def scan(source: str) -> tuple[set[str], set[str]]:
    """(drop reasons, refusal reasons) the code in `source` can count."""
    drops: set[str] = set()
    refusals: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = _name(node.func)
            if name in DROP_CALLS and node.args:
                drops |= _strings(node.args[0])
            elif name in REFUSAL_CALLS and node.args:
                refusals |= _strings(node.args[0])
            elif name == "Verdict":
                drops |= _strings(_verdict_reason(node))
        elif isinstance(node, ast.Subscript):
            name = _name(node.value)
            if name == "drops":
                drops |= _strings(node.slice)
            elif name == "rejected":
                refusals |= _strings(node.slice)
    return drops, refusals


def scan_tree() -> tuple[set[str], set[str]]:
    drops: set[str] = set()
    refusals: set[str] = set()
    for path in sorted(ROOT.rglob("*.py")):
        d, r = scan(path.read_text())
        drops |= d
        refusals |= r
    return drops, refusals


def test_every_drop_reason_in_the_code_is_documented():
    drops, _ = scan_tree()
    undocumented = sorted(r for r in drops if drop_reason(r) == "unclassified" and r != "unclassified")
    assert undocumented == [], f"add these to DROP_REASONS in dataplane/core/reasons.py: {undocumented}"


def test_every_refusal_reason_in_the_code_is_documented():
    _, refusals = scan_tree()
    undocumented = sorted(r for r in refusals if refusal_reason(r) == "unclassified")
    assert undocumented == [], f"add these to REFUSAL_REASONS in dataplane/core/reasons.py: {undocumented}"


def test_the_scan_sees_each_form_a_reason_takes():
    """The scanner itself: each counting form is found (so an empty scan
    cannot pass the tests above), on the real tree and on a sample."""
    drops, refusals = scan_tree()
    assert {"misdelivery", "inner_truncated", "bad_version", "declared_dead", "no_state",
            "policy_rejected", "unknown_chain"} <= drops
    assert {"bad_mac", "replay", "wrong_sender"} <= refusals
    sample = '''
self._drop("a1")
node.drops["a2"] += 1
raise PacketError("a3")
raise HeaderError("a4", "detail")
Drop("a5")
Verdict(Action.DROP, "a6")
Verdict(Action.REPLY, "a7", reply=b"")
Verdict(Action.DROP, reason="a8")
Verdict(Action.FORWARD, "not-a-drop")
self._drop(verdict.reason or "a9", events)
raise SyncError("r1")
self._reject("r2")
self.rejected["r3"] += 1
'''
    d, r = scan(sample)
    assert d == {f"a{i}" for i in range(1, 10)}
    assert r == {"r1", "r2", "r3"}


def test_every_documented_reason_has_a_meaning_and_aliases_point_at_documented_ones():
    for table in (DROP_REASONS, REFUSAL_REASONS):
        assert all(isinstance(v, str) and len(v) > 10 for v in table.values())
        assert "unclassified" in table
    assert all(v in DROP_REASONS for v in DROP_ALIASES.values())


def test_an_unknown_counter_name_is_exported_as_unclassified_not_lost():
    assert drop_reason("misdelivery") == "misdelivery"
    assert drop_reason("something_new") == "unclassified"
    assert refusal_reason("bad_mac") == "bad_mac"
    assert refusal_reason("something_new") == "unclassified"
