"""Shared by the integration tests. They need timm, transformers (and torchvision for timm), which the
main CPU environment does not have: there they skip, saying why. `.ci/run` runs them in
a second environment that has them, with ADCLR_REQUIRE_INTEGRATIONS=1: a missing
package is then an error, not a skip."""

import importlib
import os

import pytest

REQUIRED = os.environ.get("ADCLR_REQUIRE_INTEGRATIONS") == "1"


def need(name):
    """Import `name`, or skip the module's tests (fail under ADCLR_REQUIRE_INTEGRATIONS=1)."""
    if REQUIRED:
        return importlib.import_module(name)
    return pytest.importorskip(name, reason=f"{name} is not installed here; .ci/run runs these tests in a "
                                            "second environment that has it (torch 2.14.1 + torchvision, which "
                                            "timm needs, timm, transformers, dinov2)")
