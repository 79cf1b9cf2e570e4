from pipeline.config import GateConfig
from pipeline.gate import GateResult, robustness_checks, threshold_checks


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
    assert statuses(checks).pop("pruned_accuracy_drop") == "skipped"  # export.prune is null
    assert set(statuses(checks).values()) - {"skipped"} == {"passed"}
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


ROBUSTNESS = {
    "clean_accuracy": 0.98,
    "fgsm": {"0.0": 0.98, "0.01": 0.9, "0.03": 0.6, "0.1": 0.2},
    "worst_corruption": {"name": "contrast", "severity": 3, "accuracy": 0.7, "drop": 0.28},
}


def test_robustness_checks_are_skipped_when_unset_and_shown_as_skipped():
    checks = statuses(robustness_checks(None, GateConfig()))
    assert checks == {"min_fgsm_accuracy": "skipped", "max_corruption_drop": "skipped"}


def test_robustness_checks_compare_the_report_with_the_thresholds():
    cfg = GateConfig(min_fgsm_accuracy=0.85, fgsm_epsilon=0.01, max_corruption_drop=0.3)
    checks = {c.name: c for c in robustness_checks(ROBUSTNESS, cfg)}
    assert checks["min_fgsm_accuracy"].status == "passed" and checks["min_fgsm_accuracy"].value == 0.9
    assert (
        checks["max_corruption_drop"].status == "passed"
        and "contrast" in checks["max_corruption_drop"].detail
    )
    strict = GateConfig(min_fgsm_accuracy=0.7, fgsm_epsilon=0.03, max_corruption_drop=0.1)
    assert statuses(robustness_checks(ROBUSTNESS, strict)) == {
        "min_fgsm_accuracy": "failed",
        "max_corruption_drop": "failed",
    }


def test_a_robustness_check_without_its_figure_fails_closed():
    cfg = GateConfig(min_fgsm_accuracy=0.5, fgsm_epsilon=0.05, max_corruption_drop=0.2)
    checks = {c.name: c for c in robustness_checks({"fgsm": {"0.01": 0.9}, "worst_corruption": None}, cfg)}
    assert checks["min_fgsm_accuracy"].status == "failed" and "0.05" in checks["min_fgsm_accuracy"].detail
    assert checks["max_corruption_drop"].status == "failed"
