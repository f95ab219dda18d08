# From FastAPI, tests/utils.py (https://github.com/fastapi/fastapi, commit c3f316b7e814),
# MIT licence, Copyright (c) 2018 Sebastián Ramírez: see LICENSE. Only the two names the
# ported tests use.
import sys

import pytest

needs_py310 = pytest.mark.skipif(sys.version_info < (3, 10), reason="requires python3.10+")

workdir_lock = pytest.mark.xdist_group("workdir_lock")
