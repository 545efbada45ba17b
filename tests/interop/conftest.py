"""The interop group needs .venv-interop: fail at setup, plainly, when it is missing."""

import pytest
from interop_support import interop_python


@pytest.fixture(autouse=True)
def _interop_venv() -> None:
    interop_python()
