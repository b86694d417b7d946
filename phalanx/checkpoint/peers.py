"""Connections to every node's keeper: parity goes to the keepers holding a group's parity, a restore
reads blocks and parity from any keeper. This node's keeper is reached through this rank's own
connection (`KeeperSlots`)."""

from __future__ import annotations

from typing import Any, Optional

from phalanx.checkpoint.collectives import CheckpointCollectives
from phalanx.checkpoint.slots import KeeperSlots
from phalanx.checkpoint.wire import KeeperClient, WireError


class PeerKeepers:
    """Every node's keeper address, and a connection per other node made on first use. A connection
    that fails is closed and forgotten, so the next use connects again: the node's keeper may have been
    restarted, and a connection a failure left mid-message can never be trusted again."""

    def __init__(self, slots: KeeperSlots, secret: bytes, timeout: float):
        self.slots, self.secret, self.timeout = slots, secret, timeout
        self.addresses: dict[int, tuple[str, int]] = {}  # node -> keeper address
        self.clients: dict[int, KeeperClient] = {}

    def gather_addresses(self, collectives: CheckpointCollectives) -> None:
        """Every node's keeper address, from the ranks attached to one (collective)."""
        mine = self.slots.address()
        self.addresses = {n: tuple(a) for n, a in collectives.all_gather((self.slots.node, mine)) if a is not None}

    def call(self, node: int, op: str, payload: Optional[memoryview] = None, limit: Optional[int] = None,
             **fields: Any) -> tuple[dict[str, Any], Optional[memoryview]]:
        """The reply (header, payload) of `node`'s keeper to one request."""
        if node == self.slots.node:
            return self.slots.request(op, payload=payload, limit=limit, **fields)
        client = self.clients.get(node)
        if client is None:
            host, port = self.addresses[node]
            client = self.clients[node] = KeeperClient(host, port, self.secret, self.timeout)
        try:
            return client.call(op, payload=payload, limit=limit, **fields)
        except WireError:
            self.drop(node)
            raise

    def drop(self, node: int) -> None:
        """Close and forget the connection to `node`'s keeper, if any."""
        client = self.clients.pop(node, None)
        if client is not None:
            client.close()

    def close(self) -> None:
        for node in list(self.clients):
            self.drop(node)
