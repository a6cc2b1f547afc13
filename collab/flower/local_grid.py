"""An in-process Flower ``Grid``: the coordinator's messages go straight to a ClientApp, no Ray, no network.

For tests, experiments and debugging of strategies and apps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run


class LocalGrid(Grid):
    """A Flower ``Grid`` that hands messages to a ClientApp in this process: no Ray, no network.

    For tests and debugging of strategies and apps: ``num_nodes`` virtual nodes (node ids
    ``1001, 1002, ...``) with node config ``partition-id`` / ``num-partitions`` (plus
    ``node_configs[i]``) and the given run config. An exception in the ClientApp comes back
    as an error reply, as from a real SuperNode; ``online(node_id, server_round)`` returning
    False makes a node silent (no reply, as after a timeout). Every reply is counted in
    :attr:`delivered`.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: Mapping | None = None,
        node_configs: Sequence[Mapping] | None = None,
        online: Callable[[int, int], bool] | None = None,
    ) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        # messages built outside a Flower runtime need a task identity; keep one that is set
        if TaskIdentity._run_id is None:
            TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
        self.client_app = client_app
        self.online = online
        self.delivered = 0
        self._replies: dict[str, Message | None] = {}
        self.contexts: dict[int, Context] = {}
        extra = list(node_configs or [{}] * num_nodes)
        for i in range(num_nodes):
            node_config = {"partition-id": i, "num-partitions": num_nodes, **dict(extra[i])}
            self.contexts[1001 + i] = Context(
                run_id=1, node_id=1001 + i, node_config=node_config, state=RecordDict(),
                run_config=dict(run_config or {}),
            )

    def set_run(self, run: Run) -> None:
        """Nothing to do: one implicit run."""

    @property
    def run(self) -> Run:
        """The implicit run."""
        return Run.create_empty(run_id=1)

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        """A message to ``dst_node_id`` (deprecated in Flower; kept for the Grid interface)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        """All virtual nodes."""
        return list(self.contexts)

    def _deliver(self, message: Message) -> Message | None:
        node = message.metadata.dst_node_id
        if node not in self.contexts:
            return Message(Error(code=3, reason=f"node {node} does not exist"), reply_to=message)
        config = message.content.config_records.get("config")
        server_round = config.get("server-round", 0) if config is not None else 0
        if self.online is not None and not self.online(node, server_round):
            return None
        try:
            reply = self.client_app(message, self.contexts[node])
        except Exception as exc:  # a real SuperNode reports a ClientApp exception as an error reply
            reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)
        self.delivered += 1
        return reply

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver now; replies wait for :meth:`pull_messages`."""
        ids = []
        for i, message in enumerate(messages):
            key = f"m{len(self._replies)}-{i}"
            self._replies[key] = self._deliver(message)
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The replies to the given message ids (silent nodes have none)."""
        out = [self._replies.pop(i, None) for i in message_ids]
        return [m for m in out if m is not None]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Deliver every message and return the replies."""
        return self.pull_messages(self.push_messages(messages))
