"""The SDK's analysis request is one the server accepts: the body `client.models.analyze(...,
spec=...)` sends validates against the API's own request schema (and its cross-field job-spec
checks), and a spec the server would refuse is refused by that schema too."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.features.analysis.schemas import AnalysisCreate
from prunery.client import calls


def test_sdk_analysis_body_carries_the_spec_the_server_validates():
    spec = {"method": {"name": "l1_norm"}, "target": {"flops": 0.5}, "recovery": {"epochs": 4}}
    call = calls.create_analysis("mdl_1", "ds_1", "classification", 8, spec)
    assert (call.method, call.path) == ("POST", "/v1/models/mdl_1/analysis")
    parsed = AnalysisCreate.model_validate(call.json)
    assert parsed.spec is not None and parsed.spec.recovery.epochs == 4
    assert parsed.dataset_id == "ds_1" and parsed.round_to == 8
    # Without a spec the body is what older servers accept (no `spec` key at all).
    assert "spec" not in calls.create_analysis("mdl_1", None, "classification", 1).json


def test_a_spec_the_server_refuses_fails_its_schema():
    bad = calls.create_analysis(
        "mdl_1", "ds_1", "classification", 1, {"method": {"name": "l1_norm"}, "target": {}}
    )
    with pytest.raises(ValidationError, match="target needs exactly one of"):
        AnalysisCreate.model_validate(bad.json)


def test_remote_analyze_flags_build_the_estimate_spec(tmp_path):
    """`prunery analyze mdl_... --data ds_... --spec F --epochs 6` sends F's method/target/
    recovery with the flags on top, a body the server's schema accepts; no flag, no spec."""
    import json

    from prunery.cli import build_parser
    from prunery.cli.remote import estimate_body
    from prunery.cli.spec_flags import SpecError

    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {"method": {"name": "thinet"}, "target": {"flops": 0.4}, "recovery": {"epochs": 2}}
        )
    )
    parser = build_parser({})
    args = parser.parse_args(
        ["analyze", "mdl_1", "--data", "ds_1", "--spec", str(spec), "--epochs", "6"]
    )
    body = estimate_body(args)
    assert body == {
        "method": {"name": "thinet"},
        "target": {"flops": 0.4},
        "recovery": {"epochs": 6},
    }
    call = calls.create_analysis("mdl_1", "ds_1", "classification", 1, body)
    assert AnalysisCreate.model_validate(call.json).spec.recovery.epochs == 6
    assert estimate_body(parser.parse_args(["analyze", "mdl_1"])) is None
    spec.write_text("[1, 2]")
    with pytest.raises(SpecError, match="a JSON object is needed"):
        estimate_body(parser.parse_args(["analyze", "mdl_1", "--spec", str(spec)]))
