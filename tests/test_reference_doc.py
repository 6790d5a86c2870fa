"""docs/configuration.md is generated from the code and a stale copy is caught."""

from __future__ import annotations

import pytest
from pydantic import Field

from atomr_trio import reference_doc
from atomr_trio.runtime.deployment_spec import DeploymentSpec


def test_configuration_doc_is_current() -> None:
    assert reference_doc.main(["--check"]) == 0, "run: python -m atomr_trio.reference_doc"
    text = reference_doc.DOC.read_text()
    for key in ("`--api-key`", "`--request-timeout`", "`--data-parallel-size`", "`serving.max_queue`",
                "`token_budget.tokens_per_minute`", "`num_kv_blocks`", "`handle_signals`"):
        assert key in text


def test_a_new_field_makes_the_doc_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    class Extended(DeploymentSpec):
        brand_new_knob: int = Field(default=3, description="added without regenerating")

    monkeypatch.setattr(reference_doc, "DeploymentSpec", Extended)
    assert "brand_new_knob" in reference_doc.render()
    assert reference_doc.main(["--check"]) == 1
