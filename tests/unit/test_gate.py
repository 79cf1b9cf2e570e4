from pipeline.config import GateConfig
from pipeline.gate import GateResult, threshold_checks


def reports(accuracy=0.98, f1=0.97, baseline=0.95, keras=0.98, int8=0.97):
    return (
        {"accuracy": accuracy, "macro_f1": f1},
        {"accuracy": baseline},
        {"keras": {"accuracy": keras}, "tflite": {"int8": {"accuracy": int8}}},
    )


def statuses(checks):
    return {c.name: c.status for c in checks}


def test_good_model_passes_every_threshold():
    checks = threshold_checks(*reports(), GateConfig())
    assert set(statuses(checks).values()) == {"passed"}
    assert GateResult(checks).passed


def test_each_threshold_can_fail_on_its_own():
    cfg = GateConfig(
        min_accuracy=0.95, min_macro_f1=0.95, min_margin_over_baseline=0.01, max_int8_accuracy_drop=0.02
    )
    assert statuses(threshold_checks(*reports(accuracy=0.9), cfg))["min_accuracy"] == "failed"
    assert statuses(threshold_checks(*reports(f1=0.9), cfg))["min_macro_f1"] == "failed"
    assert statuses(threshold_checks(*reports(baseline=0.975), cfg))["margin_over_baseline"] == "failed"
    drop = threshold_checks(*reports(int8=0.90), cfg)
    assert statuses(drop)["int8_accuracy_drop"] == "failed"
    assert [c.value for c in drop if c.name == "int8_accuracy_drop"] == [0.08]
    assert not GateResult(drop).passed


def test_skipped_is_not_failed_but_reported():
    from pipeline.gate import GateCheck

    result = GateResult([GateCheck("no_regression_vs_champion", None, -0.01, "skipped", "first model")])
    assert result.passed and result.failed == []


def test_a_failed_absolute_threshold_says_it_is_policy_and_where_to_set_it():
    checks = {c.name: c for c in threshold_checks(*reports(accuracy=0.8, f1=0.7, baseline=0.6), GateConfig())}
    for name in ("min_accuracy", "min_macro_f1"):
        assert checks[name].status == "failed"
        assert f"policy value (gate.{name} in params.yaml)" in checks[name].detail
    assert "policy" not in checks["margin_over_baseline"].detail  # a relative check, not a policy floor
    passing = {c.name: c for c in threshold_checks(*reports(), GateConfig())}
    assert "policy" not in passing["min_accuracy"].detail
