from unittest.mock import ANY, patch

from fastapi import BackgroundTasks
from fastapi.testclient import TestClient

from .app import Email, outbox, record_event, send_email


def test_create_order(client: TestClient) -> None:
    response = client.post(
        "/orders", json={"item": "teapot", "quantity": 2, "email": "ann@example.com"}
    )
    assert response.status_code == 201
    assert response.json() == {
        "id": 1,
        "item": "teapot",
        "quantity": 2,
        "email": "ann@example.com",
        "status": "placed",
    }


def test_create_order_sends_a_confirmation_email(client: TestClient) -> None:
    client.post("/orders", json={"item": "teapot", "quantity": 2, "email": "ann@example.com"})
    assert outbox == [
        Email(
            to="ann@example.com",
            subject="Order 1 received",
            body="Thanks for ordering 2 x teapot.",
        )
    ]


def test_create_order_schedules_the_email(client: TestClient) -> None:
    with patch("fastapi.BackgroundTasks.add_task") as add_task:
        response = client.post(
            "/orders", json={"item": "teapot", "quantity": 2, "email": "ann@example.com"}
        )
    assert response.status_code == 201
    add_task.assert_called_once_with(
        send_email,
        "ann@example.com",
        subject="Order 1 received",
        body="Thanks for ordering 2 x teapot.",
    )
    assert outbox == []  # the mock took the task: nothing was sent


def test_invalid_order_is_rejected_and_sends_nothing(client: TestClient) -> None:
    response = client.post(
        "/orders", json={"item": "teapot", "quantity": 0, "email": "ann@example.com"}
    )
    assert response.status_code == 422
    assert outbox == []
    assert client.get("/orders").json() == []


def test_list_orders(client: TestClient) -> None:
    client.post("/orders", json={"item": "teapot", "quantity": 1, "email": "ann@example.com"})
    client.post("/orders", json={"item": "kettle", "quantity": 3, "email": "bob@example.com"})
    response = client.get("/orders")
    assert response.status_code == 200
    assert [(order["id"], order["item"]) for order in response.json()] == [
        (1, "teapot"),
        (2, "kettle"),
    ]
    assert [email.to for email in outbox] == ["ann@example.com", "bob@example.com"]


def test_get_order(client: TestClient, order: dict) -> None:
    response = client.get(f"/orders/{order['id']}")
    assert response.status_code == 200
    assert response.json() == order


def test_get_unknown_order(client: TestClient) -> None:
    response = client.get("/orders/42")
    assert response.status_code == 404
    assert response.json() == {"detail": "Order not found"}


def test_ship_order(client: TestClient, order: dict) -> None:
    response = client.post(f"/orders/{order['id']}/ship")
    assert response.status_code == 200
    assert response.json()["status"] == "shipped"
    # The task used the request's session: it read the order, and its write was
    # committed with the request's.
    assert outbox == [
        Email(to="ann@example.com", subject="Order 1 shipped", body="Your teapot is on its way.")
    ]
    events = client.get(f"/orders/{order['id']}/events").json()
    assert events == [{"message": "shipping email sent"}]
    assert client.get(f"/orders/{order['id']}").json()["status"] == "shipped"


def test_ship_order_twice(client: TestClient, order: dict) -> None:
    client.post(f"/orders/{order['id']}/ship")
    outbox.clear()
    response = client.post(f"/orders/{order['id']}/ship")
    assert response.status_code == 409
    assert outbox == []
    assert client.get(f"/orders/{order['id']}/events").json() == [
        {"message": "shipping email sent"}
    ]


def test_cancel_order(client: TestClient, order: dict) -> None:
    response = client.post(f"/orders/{order['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert client.get(f"/orders/{order['id']}/events").json() == [
        {"message": "cancelled by the customer"}
    ]
    assert outbox == [
        Email(to="ann@example.com", subject="Order 1 cancelled", body="Sorry to see it go.")
    ]


def test_cancel_order_schedules_its_tasks(client: TestClient, order: dict) -> None:
    with patch.object(BackgroundTasks, "add_task") as add_task:
        response = client.post(f"/orders/{order['id']}/cancel")
    assert response.status_code == 200
    assert add_task.call_count == 2
    add_task.assert_any_call(record_event, ANY, order["id"], "cancelled by the customer")
    add_task.assert_any_call(
        send_email, "ann@example.com", subject="Order 1 cancelled", body="Sorry to see it go."
    )
    assert client.get(f"/orders/{order['id']}/events").json() == []
    assert outbox == []
    assert client.get(f"/orders/{order['id']}").json()["status"] == "cancelled"


def test_cancel_unknown_order(client: TestClient) -> None:
    response = client.post("/orders/42/cancel")
    assert response.status_code == 404
    assert outbox == []
