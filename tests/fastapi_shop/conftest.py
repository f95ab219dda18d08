from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from .app import app, init_db, outbox, settings


@pytest.fixture(autouse=True)
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A fresh database, and an empty outbox, for each test."""
    monkeypatch.setattr(settings, "database", str(tmp_path / "shop.db"))
    init_db()
    yield
    outbox.clear()


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(app) as client:
        yield client


@pytest.fixture
def order(client: TestClient) -> dict:
    response = client.post(
        "/orders", json={"item": "teapot", "quantity": 2, "email": "ann@example.com"}
    )
    assert response.status_code == 201
    outbox.clear()
    return response.json()
