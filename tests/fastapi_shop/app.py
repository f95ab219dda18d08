"""A tiny shop: orders, their history, and the emails they send."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException
from pydantic import BaseModel, Field

import trio_bg.fastapi


class Settings:
    database: str = "shop.db"


settings = Settings()

SCHEMA = """
CREATE TABLE orders (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    item TEXT NOT NULL,
    quantity INTEGER NOT NULL,
    email TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'placed'
);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    order_id INTEGER NOT NULL REFERENCES orders (id),
    message TEXT NOT NULL
);
"""


def init_db() -> None:
    with sqlite3.connect(settings.database) as db:
        db.executescript(SCHEMA)


def get_db() -> Iterator[sqlite3.Connection]:
    """One connection per request, committed once the request is done (its background
    tasks included: they write through it too), rolled back if it failed."""
    # FastAPI runs this, the endpoint and the tasks in different threads.
    db = sqlite3.connect(settings.database, check_same_thread=False)
    db.row_factory = sqlite3.Row
    try:
        yield db
        db.commit()
    except Exception:
        db.rollback()
        raise
    finally:
        db.close()


Session = Annotated[sqlite3.Connection, Depends(get_db)]


@dataclass
class Email:
    to: str
    subject: str
    body: str


outbox: list[Email] = []  # the "mail server"


async def send_email(to: str, subject: str, body: str) -> None:
    outbox.append(Email(to, subject, body))


def record_event(db: sqlite3.Connection, order_id: int, message: str) -> None:
    """A plain function task: written through the request's session."""
    db.execute("INSERT INTO events (order_id, message) VALUES (?, ?)", (order_id, message))


async def notify_shipped(db: sqlite3.Connection, order_id: int) -> None:
    """An async task that reads and writes through the request's session."""
    order = db.execute("SELECT * FROM orders WHERE id = ?", (order_id,)).fetchone()
    await send_email(
        order["email"], f"Order {order_id} shipped", f"Your {order['item']} is on its way."
    )
    record_event(db, order_id, "shipping email sent")


class OrderIn(BaseModel):
    item: str = Field(min_length=1)
    quantity: int = Field(gt=0)
    email: str


class Order(OrderIn):
    id: int
    status: str


class Event(BaseModel):
    message: str


app = FastAPI()
trio_bg.fastapi.install(app)  # trio_bg: the only line added (with its import above)


def fetch_order(db: sqlite3.Connection, order_id: int) -> Order:
    row = db.execute("SELECT * FROM orders WHERE id = ?", (order_id,)).fetchone()
    if row is None:
        raise HTTPException(status_code=404, detail="Order not found")
    return Order(**row)


@app.post("/orders", status_code=201)
async def create_order(order: OrderIn, db: Session, background_tasks: BackgroundTasks) -> Order:
    cursor = db.execute(
        "INSERT INTO orders (item, quantity, email) VALUES (?, ?, ?)",
        (order.item, order.quantity, order.email),
    )
    order_id = cursor.lastrowid
    assert order_id is not None
    background_tasks.add_task(
        send_email,
        order.email,
        subject=f"Order {order_id} received",
        body=f"Thanks for ordering {order.quantity} x {order.item}.",
    )
    return fetch_order(db, order_id)


@app.get("/orders")
async def list_orders(db: Session) -> list[Order]:
    return [Order(**row) for row in db.execute("SELECT * FROM orders ORDER BY id")]


@app.get("/orders/{order_id}")
async def get_order(order_id: int, db: Session) -> Order:
    return fetch_order(db, order_id)


@app.get("/orders/{order_id}/events")
async def list_events(order_id: int, db: Session) -> list[Event]:
    fetch_order(db, order_id)
    rows = db.execute("SELECT message FROM events WHERE order_id = ? ORDER BY id", (order_id,))
    return [Event(message=row["message"]) for row in rows]


@app.post("/orders/{order_id}/ship")
async def ship_order(order_id: int, db: Session, background_tasks: BackgroundTasks) -> Order:
    if fetch_order(db, order_id).status != "placed":
        raise HTTPException(status_code=409, detail="Order cannot be shipped")
    db.execute("UPDATE orders SET status = 'shipped' WHERE id = ?", (order_id,))
    background_tasks.add_task(notify_shipped, db, order_id)
    return fetch_order(db, order_id)


@app.post("/orders/{order_id}/cancel")
def cancel_order(order_id: int, db: Session, background_tasks: BackgroundTasks) -> Order:
    """A plain (def) endpoint, with a plain function task."""
    order = fetch_order(db, order_id)
    if order.status != "placed":
        raise HTTPException(status_code=409, detail="Order cannot be cancelled")
    db.execute("UPDATE orders SET status = 'cancelled' WHERE id = ?", (order_id,))
    background_tasks.add_task(record_event, db, order_id, "cancelled by the customer")
    background_tasks.add_task(
        send_email, order.email, subject=f"Order {order_id} cancelled", body="Sorry to see it go."
    )
    return fetch_order(db, order_id)
