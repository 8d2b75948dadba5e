"""CI helpers: assert_rewritten, the pytest fixture, and ``python -m attn_inductor check``.

The factories live in ``tests/fixtures/attn_factories.py``: a naive causal
attention (rewritten), one that also returns its probabilities (refused by
the matcher), one with no attention, and one whose compiled output is made
to differ from eager (to exercise the numerics verdict).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import attn_inductor
from attn_inductor.testing import assert_rewritten
from attn_inductor.testing.cli import EXIT_MISS, EXIT_NUMERICS, EXIT_OK, EXIT_USAGE, load_factory, main

pytest_plugins = ["pytester"]

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FACTORIES = os.path.join(FIXTURES, "attn_factories.py")
PROBS_REASON = "attention probabilities are used by more than one consumer"


def factory(name):
    return load_factory(f"{FACTORIES}:{name}")()


# ----------------------------------------------------------------------------- assert_rewritten


def test_assert_rewritten_passes_on_causal_attention():
    model, (x,) = factory("causal")
    report = assert_rewritten(model, x, expected=1)
    assert report.all_rewritten and len(report.rewritten) == 1
    assert "kv_idx - q_idx <= 0" in report.rewritten[0].mask


def test_assert_rewritten_fails_with_the_table_when_probabilities_are_returned():
    model, (x,) = factory("returns_probs")
    with pytest.raises(AssertionError) as info:
        assert_rewritten(model, x)
    msg = str(info.value)
    assert "1 of 1 attention site(s) not rewritten" in msg
    assert "NOT rewritten" in msg and "reason: " + PROBS_REASON in msg  # the explain table, verbatim


def test_assert_rewritten_expected_count_mismatch():
    model, (x,) = factory("two_layers")
    assert_rewritten(model, x, expected=2)
    with pytest.raises(AssertionError, match=r"expected 3 attention site\(s\), found 2") as info:
        assert_rewritten(model, x, expected=3)
    assert "2 attention site(s), 2 rewritten" in str(info.value)


def test_assert_rewritten_fails_when_there_is_no_attention():
    model, x = factory("no_attention")
    with pytest.raises(AssertionError, match="no attention site found"):
        assert_rewritten(model, x)


def test_assert_rewritten_passes_kwargs_to_forward():
    model, kwargs = factory("two_layers_kwargs")
    assert len(assert_rewritten(model, **kwargs).sites) == 2


# ----------------------------------------------------------------------------- the pytest fixture


def test_pytest_fixture_is_registered_and_reports(pytester):
    pytester.makepyfile(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("attn_factories", {FACTORIES!r})
        fx = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fx)

        def test_good(assert_attention_rewritten):
            model, (x,) = fx.two_layers()
            assert_attention_rewritten(model, x, expected=2)

        def test_probs(assert_attention_rewritten):
            model, (x,) = fx.returns_probs()
            assert_attention_rewritten(model, x)
    """)
    # the plugin arrives through the pytest11 entry point, not through this file
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*NOT rewritten*", f"*reason: {PROBS_REASON}*"])
    out = result.stdout.str()
    assert "torch.__trace" not in out  # the plugin keeps torch's trace records out of the report
    assert "asserts.py" not in out     # __tracebackhide__: the failure points at the test's own line


# ----------------------------------------------------------------------------- the check command


def test_check_passes_and_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["check", f"{FACTORIES}:two_layers", "--expect", "2", "--json", str(out)]) == EXIT_OK
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("attn_inductor check: PASS ")
    data = json.loads(out.read_text())
    assert data["num_sites"] == 2 and data["num_rewritten"] == 2 and data["expected"] == 2
    assert data["passed"] and data["exit_status"] == 0 and data["verdict"] == lines[-1]
    assert data["problems"] == []
    assert data["numerics"]["ok"] and data["numerics"]["outputs"][0]["dtype"] == "float32"
    assert data["numerics"]["max_abs_err"] < 1e-5


def test_check_miss_is_nonzero(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["check", f"{FACTORIES}:returns_probs", "--json", str(out), "--no-numerics"]) == EXIT_MISS
    text = capsys.readouterr().out
    assert PROBS_REASON in text and text.strip().splitlines()[-1].startswith("attn_inductor check: FAIL ")
    data = json.loads(out.read_text())
    assert not data["passed"] and data["sites"][0]["reason"].startswith(PROBS_REASON)
    assert data["problems"] == ["1 of 1 attention site(s) not rewritten"]
    assert data["numerics"] is None


def test_check_count_mismatch_and_no_attention_are_nonzero(monkeypatch, capsys):
    # the module:factory form, imported from sys.path
    monkeypatch.syspath_prepend(FIXTURES)
    assert main(["check", "attn_factories:two_layers", "--expect", "3", "--no-numerics"]) == EXIT_MISS
    assert "expected 3 attention site(s), found 2" in capsys.readouterr().out
    assert main(["check", "attn_factories:no_attention", "--no-numerics"]) == EXIT_MISS


def test_check_numerics_mismatch_is_nonzero(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["check", f"{FACTORIES}:miscompiled", "--json", str(out)]) == EXIT_NUMERICS
    assert "outputs differ from eager" in capsys.readouterr().out.strip().splitlines()[-1]
    data = json.loads(out.read_text())
    assert data["problems"] == ["outputs differ from eager"] and data["exit_status"] == EXIT_NUMERICS
    num = data["numerics"]
    assert not num["ok"] and num["outputs"][0]["mismatched"] > 0
    assert num["outputs"][0]["max_abs_err"] == pytest.approx(1e-2, rel=1e-3)


def test_check_tolerance_override(tmp_path):
    # the same 1e-2 difference passes when the user says it may
    assert main(["check", f"{FACTORIES}:miscompiled", "--atol", "2e-2", "--rtol", "0"]) == EXIT_OK


def test_check_usage_errors(capsys):
    assert main(["check", "no_colon_here"]) == EXIT_USAGE
    assert main(["check", f"{FACTORIES}:does_not_exist"]) == EXIT_USAGE
    assert main(["check", f"{FACTORIES}:broken"]) == EXIT_USAGE
    assert main(["check", "no.such.module:f"]) == EXIT_USAGE
    assert main(["check", f"{FACTORIES}:causal", "--options", "[1]"]) == EXIT_USAGE
    assert main([]) == EXIT_USAGE  # argparse: missing command
    assert "error" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "attn_inductor", "check", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--expect" in proc.stdout


def test_compare_outputs_opens_up_objects_holding_tensors():
    """A KV cache object in the outputs (HF DynamicCache) is compared by its tensors, not by identity."""
    import types

    from attn_inductor.testing.cli import compare_outputs

    def out(k, step):
        cache = types.SimpleNamespace(layers=[types.SimpleNamespace(keys=k, values=k + 1)], step=step)
        return {"hidden": k * 2, "cache": cache, "n": 3}

    k = torch.randn(2, 3)
    same = compare_outputs(out(k.clone(), 1), out(k, 1))
    assert same["ok"]
    assert [o["name"] for o in same["outputs"]] == [
        "output['hidden']", "output['cache'].layers[0].keys", "output['cache'].layers[0].values", "output['n']"]
    moved = compare_outputs(out(k + 1e-3, 1), out(k, 1))
    assert not moved["ok"] and moved["max_abs_err"] == pytest.approx(2e-3, rel=1e-3)
    nan = torch.tensor([float("nan"), 1.0])
    assert compare_outputs(nan.clone(), nan)["ok"]                       # NaN where eager has NaN
    assert not compare_outputs(torch.tensor([0.0, 1.0]), nan)["ok"]
    assert not compare_outputs((k,), (k, k))["ok"]                       # structure differs


def test_explain_lists_dynamo_graph_breaks():
    """Code past a graph break runs in another frame or eagerly: the report says breaks happened, and why."""

    class Broken(torch.nn.Module):
        def forward(self, x):
            s = (x @ x.transpose(-1, -2)).softmax(-1)
            torch._dynamo.graph_break()
            return s @ x

    report = attn_inductor.explain(Broken(), torch.randn(1, 2, 8, 4))
    assert len(report.graph_breaks) == 1
    text = str(report)
    assert "Dynamo graph breaks: 1" in text
    assert report.to_dict()["graph_breaks"] == report.graph_breaks
    clean = attn_inductor.explain(factory("causal")[0], *factory("causal")[1])
    assert clean.graph_breaks == [] and "graph breaks" not in str(clean)


def test_keyword_inputs_are_named_as_passed():
    """A mask that reaches ``forward(**kwargs)`` is reported under the caller's keyword."""

    class Masked(torch.nn.Module):
        def forward(self, x, **kwargs):
            s = x @ x.transpose(-1, -2) * 0.5
            s = s.masked_fill(kwargs["attention_mask"][:, None, None, :] == 0, float("-inf"))
            return s.softmax(-1) @ x

    mask = torch.ones(1, 8, dtype=torch.long)
    report = assert_rewritten(Masked(), torch.randn(1, 2, 8, 4), attention_mask=mask, expected=1)
    assert report.sites[0].mask.startswith("attention_mask["), report.sites[0].mask
    assert "kwargs" not in report.sites[0].mask
