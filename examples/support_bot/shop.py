"""The demo shop's orders in SQLite, and the tools the bot offers the model.

``lookup_order`` and ``start_return`` read and write the database; ``escalate`` hands the
chat to a person (the bot stops answering). Every tool answers with a JSON text the model
reads back as the tool message.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any

ORDER_ID = re.compile(r"\bNW-\d{4}\b")
SAMPLE_ORDERS = [
    ("NW-1001", "Ada Lovelace", "2-person tent", "shipped", "2026-12-01", "arrives 2026-12-08"),
    ("NW-1002", "Alan Turing", "hiking boots, size 44", "delivered", "2026-11-20", "delivered"),
    ("NW-1003", "Grace Hopper", "down jacket", "processing", "2026-12-05", "ships in 2 days"),
    ("NW-1004", "Edsger Dijkstra", "headlamp", "delivered", "2026-11-02", "delivered"),
]
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "description": "Look up an order's items, status and delivery by its id (NW-1234).",
            "parameters": {
                "type": "object",
                "properties": {"order_id": {"type": "string", "pattern": "^NW-[0-9]{4}$"}},
                "required": ["order_id"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "start_return",
            "description": "Start a return of a delivered order.",
            "parameters": {
                "type": "object",
                "properties": {
                    "order_id": {"type": "string", "pattern": "^NW-[0-9]{4}$"},
                    "reason": {"type": "string", "maxLength": 200},
                },
                "required": ["order_id", "reason"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "escalate",
            "description": "Hand the conversation to a human agent.",
            "parameters": {
                "type": "object",
                "properties": {"summary": {"type": "string", "maxLength": 200}},
                "required": ["summary"],
            },
        },
    },
]


class Shop:
    """The orders database (a file, or ``:memory:``) and the tools that use it."""

    def __init__(self, path: str | Path = ":memory:") -> None:
        self.db = sqlite3.connect(str(path), check_same_thread=False)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, customer TEXT, items TEXT,"
            " status TEXT, ordered TEXT, delivery TEXT)"
        )
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS returns (order_id TEXT PRIMARY KEY, reason TEXT)"
        )
        self.db.executemany("INSERT OR IGNORE INTO orders VALUES (?, ?, ?, ?, ?, ?)", SAMPLE_ORDERS)
        self.db.commit()

    def close(self) -> None:
        self.db.close()

    def lookup_order(self, order_id: str) -> dict[str, Any]:
        row = self.db.execute(
            "SELECT id, items, status, ordered, delivery FROM orders WHERE id = ?", (order_id,)
        ).fetchone()
        if row is None:
            return {"error": f"no order {order_id}"}
        returned = self.db.execute(
            "SELECT 1 FROM returns WHERE order_id = ?", (order_id,)
        ).fetchone()
        keys = ("order_id", "items", "status", "ordered", "delivery")
        return {**dict(zip(keys, row, strict=True)), "return_started": returned is not None}

    def start_return(self, order_id: str, reason: str) -> dict[str, Any]:
        order = self.lookup_order(order_id)
        if "error" in order:
            return order
        if order["status"] != "delivered":
            return {"error": f"order {order_id} is {order['status']}; only delivered orders"}
        self.db.execute("INSERT OR REPLACE INTO returns VALUES (?, ?)", (order_id, reason))
        self.db.commit()
        return {"order_id": order_id, "return": "started", "label": "emailed to the customer"}

    def run(self, name: str, arguments: str) -> str:
        """A tool call's result as JSON text (an error object for a bad call)."""
        try:
            args = json.loads(arguments)
        except ValueError:
            return json.dumps({"error": "arguments are not JSON"})
        try:
            if name == "lookup_order":
                result = self.lookup_order(str(args["order_id"]))
            elif name == "start_return":
                result = self.start_return(str(args["order_id"]), str(args.get("reason", "")))
            elif name == "escalate":
                result = {"handed_over": True, "summary": str(args.get("summary", ""))}
            else:
                result = {"error": f"no tool {name}"}
        except (KeyError, TypeError):
            result = {"error": f"missing arguments for {name}"}
        return json.dumps(result)
