"""Code ported from FastAPI (https://github.com/fastapi/fastapi, commit c3f316b7e814),
MIT licence, Copyright (c) 2018 Sebastián Ramírez: see LICENSE here. The layout is
FastAPI's: ``docs_src/`` is its ``docs_src/``, ``test_tutorial/`` its
``tests/test_tutorial/``, ``utils.py`` its ``tests/utils.py``, the ``test_*.py`` here
its ``tests/test_*.py``. Each file says what changed; the tests themselves did not,
but for the module paths in their imports and, in the tests that define their apps,
the install line added after each ``app = FastAPI()``."""
